//! The trainer: AdamW with per-group settings, lr schedules, gradient accumulation and
//! clipping, EMA, a non-finite guard, atomic checkpoints and exact resume.
//!
//! ```ignore
//! use softalign_core::train::{train, ResumeFrom, TrainerOptions};
//! let mut opts = TrainerOptions::new("runs/exp1", 42);
//! opts.recipe = resolved_recipe_json;
//! opts.resume = Some(ResumeFrom::Latest);
//! let summary = train(&recipe.train, &recipe.logging, opts, &mut task)?;
//! ```
pub mod checkpoint;
pub mod config;
pub mod ddpo;
pub mod ema;
pub mod glob;
pub mod optim;
pub mod parallel;
pub mod precision;
pub mod preempt;
pub mod run_lock;
pub mod schedule;
pub mod seed;
pub mod task;
pub mod trainer;

pub use checkpoint::ResumeFrom;
pub use config::TrainConfig;
pub use optim::AdamW;
pub use parallel::{Collective, Placement};
pub use preempt::{Preemption, StopFlag};
pub use schedule::LrSchedule;
pub use task::{MicroStep, TrainTask};
pub use trainer::{export_checkpoint, train, TrainSummary, TrainerOptions};
