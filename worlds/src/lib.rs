//! Worlds that run anywhere: synthetic text-to-image tasks small enough to train and judge on
//! a laptop CPU, and GenEval's formats so the same commands work on the real benchmark.
//!
//! - [`shapes`]: coloured shapes on a white canvas, captions, held-out evaluation prompts in
//!   GenEval's six categories, and an exact scorer.
//! - [`geneval`]: GenEval's prompt metadata, folder layout, judging rules, results and summary.
pub mod error;
pub mod geneval;
pub mod shapes;

pub use error::{Error, Result};
