//! DDPM training noise as diffusers' `DDPMScheduler` / `DDIMScheduler` compute it: the beta
//! schedule, `alphas_cumprod`, `add_noise` and `get_velocity` (the v-prediction target).
use serde::{Deserialize, Serialize};
use softalign_core::backbone::{NoiseProcess, Prediction};
use softalign_core::{Error, Result};
use tch::{Device, Kind, Tensor};

/// diffusers' `beta_schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    /// linspace(sqrt(start), sqrt(end))^2: Stable Diffusion's.
    #[default]
    ScaledLinear,
}

/// The training-time schedule (scheduler_config.json's `num_train_timesteps`, `beta_start`,
/// `beta_end`, `beta_schedule`, `rescale_betas_zero_snr`); Stable Diffusion 1.x/2.x and SDXL
/// all use the default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BetaConfig {
    pub num_train_timesteps: i64,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// diffusers' `rescale_betas_zero_snr` (Lin et al. 2024, "Common Diffusion Noise Schedules
    /// and Sample Steps are Flawed"): the betas rescaled so the last timestep carries no signal,
    /// as sampling from pure noise assumes. Only a v-prediction model can be sampled there.
    pub rescale_betas_zero_snr: bool,
}

impl Default for BetaConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            rescale_betas_zero_snr: false,
        }
    }
}

impl BetaConfig {
    pub fn validate(&self) -> Result<()> {
        if self.num_train_timesteps < 2 {
            return Err(Error::Recipe(format!(
                "`num_train_timesteps` must be at least 2 (got {})",
                self.num_train_timesteps
            )));
        }
        if !(self.beta_start > 0.0 && self.beta_end < 1.0 && self.beta_start <= self.beta_end) {
            return Err(Error::Recipe(format!(
                "betas must satisfy 0 < beta_start <= beta_end < 1 (got {}..{})",
                self.beta_start, self.beta_end
            )));
        }
        Ok(())
    }

    /// `alphas_cumprod` (num_train_timesteps,) in fp32 on the CPU, with diffusers' arithmetic.
    pub fn alphas_cumprod(&self) -> Tensor {
        let n = self.num_train_timesteps;
        let opts = (Kind::Float, Device::Cpu);
        let betas = match self.beta_schedule {
            BetaSchedule::Linear => Tensor::linspace(self.beta_start, self.beta_end, n, opts),
            BetaSchedule::ScaledLinear => {
                Tensor::linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n, opts).square()
            }
        };
        let betas = if self.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        (-betas + 1.0).cumprod(0, Kind::Float)
    }
}

/// diffusers' `rescale_zero_terminal_snr`, op for op: sqrt(abar) shifted so its last value is
/// 0 and scaled so its first is unchanged, turned back into betas.
fn rescale_zero_terminal_snr(betas: &Tensor) -> Tensor {
    let alphas = -betas + 1.0;
    let sqrt_bar = alphas.cumprod(0, Kind::Float).sqrt();
    let first_t = sqrt_bar.get(0);
    let last_t = sqrt_bar.get(-1);
    // diffusers subtracts and multiplies with fp32 tensors; keep its order of operations.
    let shifted = &sqrt_bar - &last_t;
    let scale = &first_t / (&first_t - &last_t);
    let bar = (shifted * scale).square();
    let n = bar.size()[0];
    let ratio = bar.narrow(0, 1, n - 1) / bar.narrow(0, 0, n - 1);
    let alphas = Tensor::cat(&[bar.narrow(0, 0, 1), ratio], 0);
    -alphas + 1.0
}

/// x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; target eps or v = sqrt(abar_t) eps -
/// sqrt(1 - abar_t) x0. Timesteps are integers 0..num_train_timesteps-1 given as floats.
#[derive(Debug)]
pub struct DdpmNoise {
    pub betas: BetaConfig,
    pub prediction: Prediction,
    /// fp32 values (a `Tensor` is not `Sync`; the trainer shares the noise across threads).
    alphas_cumprod: Vec<f32>,
}

impl DdpmNoise {
    pub fn new(betas: BetaConfig, prediction: Prediction) -> Result<Self> {
        betas.validate()?;
        if prediction == Prediction::Velocity {
            return Err(Error::Recipe(
                "DDPM noise predicts epsilon or v_prediction, not flow velocity".into(),
            ));
        }
        if betas.rescale_betas_zero_snr && prediction != Prediction::VPrediction {
            return Err(Error::Recipe(
                "`rescale_betas_zero_snr = true` needs `prediction_type = \"v_prediction\"` (an \
                 epsilon model's x0 is undefined at zero SNR)"
                    .into(),
            ));
        }
        let alphas_cumprod = Vec::<f32>::try_from(&betas.alphas_cumprod())
            .map_err(|e| Error::invalid(format!("alphas_cumprod: {e}")))?;
        Ok(Self {
            betas,
            prediction,
            alphas_cumprod,
        })
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// (sqrt(abar_t), sqrt(1 - abar_t)) shaped to broadcast over `like`, in its dtype (diffusers
    /// casts `alphas_cumprod` to the sample dtype before taking roots).
    fn coefficients(&self, t: &Tensor, like: &Tensor) -> (Tensor, Tensor) {
        let n = self.betas.num_train_timesteps;
        let idx = t
            .to_device(Device::Cpu)
            .round()
            .clamp(0.0, (n - 1) as f64)
            .to_kind(Kind::Int64);
        let a = Tensor::from_slice(&self.alphas_cumprod)
            .to_kind(like.kind())
            .index_select(0, &idx)
            .to_device(like.device());
        let mut shape = vec![-1i64];
        shape.extend(std::iter::repeat_n(1, like.dim().saturating_sub(1)));
        let sa = a.sqrt().reshape(&shape[..]);
        let sb = (-&a + 1.0).sqrt().reshape(&shape[..]);
        (sa, sb)
    }

    pub fn velocity(&self, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Tensor {
        let (sa, sb) = self.coefficients(t, x0);
        sa * eps - sb * x0
    }
}

impl NoiseProcess for DdpmNoise {
    fn add_noise(&self, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Tensor {
        let (sa, sb) = self.coefficients(t, x0);
        sa * x0 + sb * eps
    }

    fn target(&self, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Tensor {
        match self.prediction {
            Prediction::VPrediction => self.velocity(x0, eps, t),
            _ => eps.shallow_clone(),
        }
    }

    /// x_t = a x0 + s eps: from epsilon x0 = (x_t - s eps) / a; from v = a eps - s x0,
    /// x0 = a x_t - s v (a^2 + s^2 = 1).
    fn predicted_x0(&self, x_t: &Tensor, pred: &Tensor, t: &Tensor) -> Tensor {
        let (sa, sb) = self.coefficients(t, x_t);
        match self.prediction {
            Prediction::VPrediction => sa * x_t - sb * pred,
            _ => (x_t - sb * pred) / sa,
        }
    }

    fn sample_timesteps(&self, n: i64, device: Device) -> Tensor {
        Tensor::randint(self.betas.num_train_timesteps, [n], (Kind::Int64, device))
            .to_kind(Kind::Float)
    }
}
