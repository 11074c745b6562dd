//! diffusers `models/embeddings.py`: `Timesteps` (the sinusoid) and `TimestepEmbedding`
//! (`linear_1`, SiLU, `linear_2`), used for the timestep and SDXL's `text_time` conditioning.
use tch::nn::{self, Module};
use tch::Tensor;

pub use crate::sd3::embeddings::timestep_embedding;

/// `Timesteps(num_channels, flip_sin_to_cos, downscale_freq_shift)`: fp32 sinusoids of (N,).
#[derive(Debug, Clone, Copy)]
pub struct Timesteps {
    pub num_channels: i64,
    pub flip_sin_to_cos: bool,
    pub shift: f64,
}

impl Timesteps {
    pub fn forward(&self, t: &Tensor) -> Tensor {
        timestep_embedding(t, self.num_channels, self.flip_sin_to_cos, self.shift)
    }
}

/// `TimestepEmbedding(in_channels, time_embed_dim)` with SiLU and no post activation.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: crate::linear::SiteLinear,
    linear_2: crate::linear::SiteLinear,
}

impl TimestepEmbedding {
    pub fn new(p: nn::Path, in_channels: i64, dim: i64) -> Self {
        Self {
            linear_1: crate::linear::linear(&p / "linear_1", in_channels, dim, Default::default()),
            linear_2: crate::linear::linear(&p / "linear_2", dim, dim, Default::default()),
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(x).silu())
    }
}
