//! One file per subcommand.
pub mod build;
pub mod list;
pub mod loss;
pub mod recipe;
pub mod train;
