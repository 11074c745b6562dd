//! Progress bar, metrics.jsonl, and the optional W&B bridge.
pub mod config;

pub use config::LoggingConfig;
