//! One file per subcommand.
pub mod bench;
pub mod build;
pub mod demo;
pub mod eval;
pub mod forward;
pub mod forward_text;
pub mod forward_vae;
pub mod generate;
pub mod grid;
pub mod list;
pub mod loss;
pub mod model;
pub mod progress;
pub mod recipe;
pub mod report;
pub mod sample;
pub mod train;
