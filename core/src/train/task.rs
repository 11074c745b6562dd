//! What the trainer drives: anything that can compute gradients for a micro-batch.
use std::collections::BTreeMap;
use std::path::Path;

use tch::Tensor;

use crate::Result;

/// One micro-batch of an optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct MicroStep {
    /// 0-based optimizer step.
    pub step: u64,
    /// 0-based micro-batch within the step.
    pub micro: u32,
    /// Multiply the loss by this before `backward` (1 / grad_accum), so accumulated gradients
    /// are the mean over micro-batches.
    pub loss_scale: f64,
}

/// The trainer seeds torch's global generator from (seed, step, micro) before each
/// `micro_step`, so every random draw a task makes there (data indices, timesteps, noise) is
/// fixed by the run's seed and reproduced exactly after a resume.
pub trait TrainTask {
    /// Trainable parameters: fp32 leaves with requires_grad, named, the same for the whole run.
    fn parameters(&self) -> Vec<(String, Tensor)>;
    /// Tensors a checkpoint must hold besides parameters and optimizer state (EMA tokens, ...).
    fn extra_state(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    fn load_extra_state(&mut self, _tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
    /// Forward and backward of one micro-batch: gradients accumulate into the parameters'
    /// `.grad`. Returns the logged terms; `loss` is the weighted total (before `loss_scale`).
    fn micro_step(&mut self, m: &MicroStep) -> Result<BTreeMap<String, f64>>;
    /// Called after every optimizer step (an adapter's token EMA moves here).
    fn after_step(&mut self, _step: u64) -> Result<()> {
        Ok(())
    }
    /// Writes the run's result into `dir` (adapter files, or the trained backbone folder).
    fn export(&self, dir: &Path, step: u64) -> Result<()>;
}
