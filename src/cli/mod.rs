//! One file per subcommand.
pub mod bench;
pub mod forward;
pub mod list;
pub mod recipe;
