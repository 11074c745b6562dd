//! The trainer: AdamW with per-group settings, lr schedules, gradient accumulation and
//! clipping, EMA, a non-finite guard, atomic checkpoints and exact resume.
pub mod config;
pub mod task;

pub use config::TrainConfig;
pub use task::{MicroStep, TrainTask};
