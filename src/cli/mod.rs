//! One file per subcommand.
pub mod list;
pub mod recipe;
