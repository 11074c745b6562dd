//! One file per subcommand.
pub mod list;
pub mod loss;
pub mod recipe;
