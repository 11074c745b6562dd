//! DDIM with eta > 0 as a stochastic policy (DDPO, Black et al.): each step draws
//! x_{t-1} ~ N(mean(x_t, model_output), std_t^2 I), and the policy gradient needs the log
//! density of the step that was taken. This follows ddpo-pytorch's `ddim_step_with_logprob`
//! (diffusers_patch/ddim_with_logprob.py) exactly, including two of its choices:
//! - the previous timestep is clamped to [0, N - 1], so the last step uses alphas_cumprod[0]
//!   (never `set_alpha_to_one`'s 1.0; the same for Stable Diffusion, whose config sets it false);
//! - the log density is the mean, not the sum, over the non-batch dimensions.
//!
//! Timesteps may differ per sample (DDPO's training shuffles each trajectory's steps).
use softalign_core::backbone::Prediction;
use softalign_core::sampler::{PolicyStep, StochasticPolicy};
use softalign_core::{Error, Result};
use tch::{Kind, Tensor};

use super::ddim::Ddim;

/// One policy step.
pub struct LogProbStep {
    /// x_{t-1}: the given one, or mean + std * noise.
    pub prev_sample: Tensor,
    /// log N(prev_sample; mean, std^2), averaged over (C, H, W): (B,). Carries the graph of
    /// `model_output` (through the mean), never of `prev_sample`.
    pub log_prob: Tensor,
    /// The Gaussian's mean (B, C, H, W).
    pub mean: Tensor,
}

impl Ddim {
    /// A step from `timesteps` (one per sample) with the sampler's eta. `prev_sample`: score
    /// that sample (the training pass); None: draw one from torch's global generator (the
    /// sampling pass).
    pub fn step_with_log_prob(
        &self,
        model_output: &Tensor,
        timesteps: &[i64],
        sample: &Tensor,
        prediction: Prediction,
        prev_sample: Option<&Tensor>,
    ) -> Result<LogProbStep> {
        let eta = self.spec.eta;
        if eta <= 0.0 {
            return Err(Error::invalid(format!(
                "ddim log-probability: eta = {eta} makes the step deterministic (no density); \
                 DDPO samples with eta > 0 (ddpo-pytorch: 1.0)"
            )));
        }
        let size = sample.size();
        if size.is_empty() || size[0] != timesteps.len() as i64 {
            return Err(Error::tensor(
                "sample",
                format!("shape {size:?} for {} timesteps", timesteps.len()),
            ));
        }
        let n = self.spec.num_train_timesteps;
        let stride = n / self.spec.steps as i64;
        let ac = self.alphas_cumprod();
        let mut a_t = Vec::with_capacity(timesteps.len());
        let mut a_prev = Vec::with_capacity(timesteps.len());
        for &t in timesteps {
            if !(0..n).contains(&t) {
                return Err(Error::invalid(format!(
                    "ddim log-probability: timestep {t} out of range 0..{n}"
                )));
            }
            let prev = (t - stride).clamp(0, n - 1);
            if prev == t {
                // ddpo-pytorch's clamp makes the step from t = 0 noise-free: no density.
                return Err(Error::invalid(format!(
                    "ddim log-probability: the step from timestep {t} adds no noise (its \
                     predecessor clamps to itself); use steps_offset >= 1"
                )));
            }
            a_t.push(ac[t as usize]);
            a_prev.push(ac[prev as usize]);
        }
        // Per-sample scalars broadcast over (C, H, W), in fp32 as the reference.
        let mut col_shape = vec![1i64; size.len()];
        col_shape[0] = size[0];
        let dev = sample.device();
        let col = |v: &[f32]| Tensor::from_slice(v).to_device(dev).reshape(&col_shape);
        let (a_t, a_prev) = (col(&a_t), col(&a_prev));
        let b_t = a_t.ones_like() - &a_t;
        let (x0, eps) = match prediction {
            Prediction::Epsilon => (
                (sample - b_t.sqrt() * model_output) / a_t.sqrt(),
                model_output.shallow_clone(),
            ),
            Prediction::VPrediction => (
                a_t.sqrt() * sample - b_t.sqrt() * model_output,
                a_t.sqrt() * model_output + b_t.sqrt() * sample,
            ),
            Prediction::Velocity => {
                return Err(Error::invalid(
                    "ddim log-probability: the backbone predicts flow velocity, not DDPM noise",
                ))
            }
        };
        let x0 = if self.spec.clip_sample {
            let r = self.spec.clip_sample_range;
            x0.clamp(-r, r)
        } else {
            x0
        };
        let b_prev = a_prev.ones_like() - &a_prev;
        let variance = (&b_prev / &b_t) * (a_t.ones_like() - &a_t / &a_prev);
        let std = variance.sqrt() * eta;
        let direction = (b_prev - std.square()).sqrt() * eps;
        let mean = a_prev.sqrt() * x0 + direction;
        let prev_sample = match prev_sample {
            Some(p) => {
                if p.size() != size {
                    return Err(Error::tensor(
                        "prev_sample",
                        format!("shape {:?}, expected {size:?}", p.size()),
                    ));
                }
                p.shallow_clone()
            }
            None => &mean + &std * Tensor::randn_like(&mean),
        };
        let half_log_two_pi = (2.0 * std::f64::consts::PI).sqrt().ln();
        let log_prob = -(prev_sample.detach() - &mean).square() / (std.square() * 2.0)
            - std.log()
            - half_log_two_pi;
        let dims: Vec<i64> = (1..size.len() as i64).collect();
        let log_prob = log_prob.mean_dim(dims.as_slice(), false, Kind::Float);
        Ok(LogProbStep {
            prev_sample,
            log_prob,
            mean,
        })
    }
}

impl StochasticPolicy for Ddim {
    fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    fn step_with_log_prob(
        &self,
        model_output: &Tensor,
        timesteps: &[i64],
        sample: &Tensor,
        prediction: Prediction,
        prev_sample: Option<&Tensor>,
    ) -> Result<PolicyStep> {
        let s = Ddim::step_with_log_prob(
            self,
            model_output,
            timesteps,
            sample,
            prediction,
            prev_sample,
        )?;
        Ok(PolicyStep {
            prev_sample: s.prev_sample,
            log_prob: s.log_prob,
        })
    }
}
