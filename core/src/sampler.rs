//! Samplers turn noise into images with a backbone, its adapters and classifier-free guidance.
use tch::Tensor;

use crate::adapter::{Adapter, TokenSelection};
use crate::backbone::{Backbone, Conditioning};
use crate::{Error, Result};

/// Which tokens each guidance branch uses. `None` runs that branch without adapters.
/// SoftREPA puts its tokens in both branches; AGSM the positive set in both.
#[derive(Debug, Clone)]
pub struct Guidance {
    pub scale: f64,
    pub cond_tokens: Option<TokenSelection>,
    pub uncond_tokens: Option<TokenSelection>,
}

pub struct SampleRequest<'a> {
    pub backbone: &'a dyn Backbone,
    pub adapters: &'a [Box<dyn Adapter>],
    /// Initial noise (B, C, H, W); seeds live with whoever drew it.
    pub noise: Tensor,
    pub cond: &'a Conditioning,
    pub uncond: Option<&'a Conditioning>,
    pub guidance: Guidance,
    pub progress: bool,
}

pub trait Sampler: Send {
    fn name(&self) -> &str;
    fn sample(&self, req: SampleRequest<'_>) -> Result<Tensor>;
    /// The sampler as a stochastic policy with step densities (DDPO), where it is one.
    fn as_policy(&self) -> Option<&dyn StochasticPolicy> {
        None
    }
}

/// One policy step: the next latents and the log density of having taken that step.
pub struct PolicyStep {
    pub prev_sample: Tensor,
    /// (B,): carries the graph of the model output, never of `prev_sample`.
    pub log_prob: Tensor,
}

/// A sampler whose steps are Gaussian draws (DDIM with eta > 0): what reinforcement learning
/// on trajectories (DDPO) needs from it.
pub trait StochasticPolicy {
    /// Model timesteps, first to last.
    fn timesteps(&self) -> &[i64];
    /// A step from `timesteps` (one per sample): score `prev_sample` (training) or draw one
    /// from torch's global generator (sampling).
    fn step_with_log_prob(
        &self,
        model_output: &Tensor,
        timesteps: &[i64],
        sample: &Tensor,
        prediction: crate::backbone::Prediction,
        prev_sample: Option<&Tensor>,
    ) -> Result<PolicyStep>;
}

/// Stops sampling once the latents are no longer finite (a huge guidance scale, an fp16
/// overflow): decoding them would write black or noise images and report success.
pub fn check_finite(x: &Tensor, step: usize, steps: usize, guidance: f64) -> Result<()> {
    let finite = x.isfinite().all().int64_value(&[]) != 0;
    if finite {
        return Ok(());
    }
    Err(Error::tensor(
        "latents",
        format!(
            "not finite after sampling step {} of {steps} (guidance scale {guidance}); lower \
             the guidance scale, or sample in another dtype",
            step + 1
        ),
    ))
}
