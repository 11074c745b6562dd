//! One file per subcommand.
pub mod bench;
pub mod build;
pub mod forward;
pub mod list;
pub mod loss;
pub mod recipe;
pub mod train;
