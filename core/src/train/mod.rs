//! Trainer.
pub mod config;
pub use config::TrainConfig;
