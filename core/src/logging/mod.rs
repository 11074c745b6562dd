//! Logging: the progress bar, the run folder's metrics.jsonl and record files, and W&B.
pub mod config;
pub mod jsonl;
pub mod progress;
pub mod run_dir;
pub mod wandb;

pub use config::{LoggingConfig, WandbConfig, WandbMode};
pub use jsonl::JsonlSink;
pub use progress::Progress;
pub use wandb::WandbSink;
