//! Rectified-flow training noise of SD3: x_t = (1 - sigma) x0 + sigma eps, target eps - x0,
//! model timestep t = 1000 sigma, and how training draws sigma.
use serde::{Deserialize, Serialize};
use softalign_core::backbone::NoiseProcess;
use softalign_core::{Error, Result};
use tch::{Device, Kind, Tensor};

/// The distribution of training timesteps. All draws use torch's global generator.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TimestepSampling {
    /// t ~ U{0, ..., 999}, sigma = t / 1000 (the SoftREPA reference).
    #[default]
    UniformInt,
    /// sigma ~ U(0, 1).
    Uniform,
    /// sigma = sigmoid(N(mean, std)) (SD3 paper's logit-normal).
    LogitNormal {
        #[serde(default)]
        mean: f64,
        #[serde(default = "one")]
        std: f64,
    },
}

fn one() -> f64 {
    1.0
}

/// `shift * s / (1 + (shift - 1) * s)`: diffusers' static shift of sigma.
pub fn shift_sigma(sigma: &Tensor, shift: f64) -> Tensor {
    sigma * shift / ((sigma * (shift - 1.0)) + 1.0)
}

#[derive(Debug, Clone)]
pub struct FlowMatch {
    pub sampling: TimestepSampling,
    /// Applied to the drawn sigma; 1.0 leaves it unchanged.
    pub shift: f64,
}

impl FlowMatch {
    pub fn new(sampling: TimestepSampling, shift: f64) -> Result<Self> {
        if !(shift.is_finite() && shift > 0.0) {
            return Err(Error::Recipe(format!(
                "backbone sd3: `timestep_shift` must be positive (got {shift})"
            )));
        }
        if let TimestepSampling::LogitNormal { mean, std } = &sampling {
            if !(mean.is_finite() && std.is_finite() && *std > 0.0) {
                return Err(Error::Recipe(format!(
                    "backbone sd3: `timesteps` logit_normal needs a finite mean and a positive std \
                     (got mean {mean}, std {std})"
                )));
            }
        }
        Ok(Self { sampling, shift })
    }

    fn sigma(t: &Tensor, like: &Tensor) -> Tensor {
        let n = like.dim() as i64;
        let mut shape = vec![-1i64];
        shape.extend(std::iter::repeat_n(1, (n - 1) as usize));
        (t.to_kind(Kind::Float) / 1000.0)
            .to_kind(like.kind())
            .to_device(like.device())
            .reshape(shape)
    }
}

impl NoiseProcess for FlowMatch {
    fn add_noise(&self, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Tensor {
        let s = Self::sigma(t, x0);
        x0 * (-&s + 1.0) + eps * s
    }

    fn target(&self, x0: &Tensor, eps: &Tensor, _t: &Tensor) -> Tensor {
        eps - x0
    }

    /// x_t = (1 - s) x0 + s eps and v = eps - x0 give x0 = x_t - s v.
    fn predicted_x0(&self, x_t: &Tensor, pred: &Tensor, t: &Tensor) -> Tensor {
        x_t - Self::sigma(t, x_t) * pred
    }

    fn sample_timesteps(&self, n: i64, device: Device) -> Tensor {
        let opts = (Kind::Float, device);
        let sigma = match &self.sampling {
            TimestepSampling::UniformInt => {
                let t = Tensor::randint(1000, [n], (Kind::Int64, device)).to_kind(Kind::Float);
                if self.shift == 1.0 {
                    // Integer model timesteps exactly, as the reference feeds them.
                    return t;
                }
                t / 1000.0
            }
            TimestepSampling::Uniform => Tensor::rand([n], opts),
            TimestepSampling::LogitNormal { mean, std } => {
                (Tensor::randn([n], opts) * *std + *mean).sigmoid()
            }
        };
        let sigma = if self.shift == 1.0 {
            sigma
        } else {
            shift_sigma(&sigma, self.shift)
        };
        sigma * 1000.0
    }
}
