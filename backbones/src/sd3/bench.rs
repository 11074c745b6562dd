//! Timing of the MMDiT forward and forward+backward, with and without soft tokens.

use softalign_core::backbone::Conditioning;
use softalign_core::dtype::DType;
use softalign_core::site::SiteSelector;
use softalign_core::{Error, Result};
use tch::{Device, Kind, Tensor};

use super::config::Sd3Config;
use super::flow_match::{FlowMatch, TimestepSampling};
use super::spec::Sd3Backbone;
use crate::bench::{bench_tokens, time_cases, BenchInputs};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub model: Sd3Config,
    pub batch: i64,
    /// Image side in pixels; the latent is 1/8 of it (the SD3 VAE).
    pub resolution: i64,
    pub text_len: i64,
    pub iters: usize,
    pub warmup: usize,
    pub device: Device,
    pub dtype: DType,
    pub tokens: i64,
    /// Soft tokens go into blocks 0..token_blocks.
    pub token_blocks: i64,
}

impl BenchConfig {
    /// Sized for a 2-core CPU: an 8-block MMDiT of width 128 at 256 px, batch 4.
    pub fn small_cpu() -> Self {
        Self {
            model: Sd3Config {
                sample_size: 32,
                num_layers: 8,
                attention_head_dim: 32,
                num_attention_heads: 4,
                joint_attention_dim: 256,
                caption_projection_dim: 128,
                pooled_projection_dim: 128,
                pos_embed_max_size: Some(64),
                ..Sd3Config::default()
            },
            batch: 4,
            resolution: 256,
            text_len: 77,
            iters: 5,
            warmup: 1,
            device: Device::Cpu,
            dtype: DType::F32,
            tokens: 4,
            token_blocks: 5,
        }
    }
}

pub use crate::bench::{host_peak_mib, BenchRow};

pub fn run(cfg: &BenchConfig, mut report: impl FnMut(&BenchRow)) -> Result<Vec<BenchRow>> {
    if cfg.resolution % 8 != 0 || cfg.batch <= 0 || cfg.iters == 0 {
        return Err(Error::invalid(
            "bench: resolution must be a multiple of 8, batch and iters positive",
        ));
    }
    if cfg.token_blocks > cfg.model.num_layers {
        return Err(Error::invalid(format!(
            "bench: tokens in {} blocks but the model has {}",
            cfg.token_blocks, cfg.model.num_layers
        )));
    }
    let dev = cfg.device;
    let noise = FlowMatch::new(TimestepSampling::UniformInt, 1.0)?;
    let bb = Sd3Backbone::random(&cfg.model, dev, cfg.dtype, noise)?;
    let m = &cfg.model;
    let lat = cfg.resolution / 8;
    let kind = cfg.dtype.kind();
    let x = Tensor::randn([cfg.batch, m.in_channels, lat, lat], (kind, dev));
    let t = Tensor::randint(1000, [cfg.batch], (Kind::Int64, dev)).to_kind(Kind::Float);
    let cond = Conditioning::new()
        .with(
            "encoder_hidden_states",
            Tensor::randn(
                [cfg.batch, cfg.text_len, m.joint_attention_dim],
                (kind, dev),
            ),
        )
        .with(
            "pooled_projections",
            Tensor::randn([cfg.batch, m.pooled_projection_dim], (kind, dev)),
        );
    let inputs = BenchInputs {
        backbone: &bb,
        x,
        t,
        cond,
        adapter: bench_tokens(
            &bb,
            cfg.tokens,
            SiteSelector::One(format!("joint_blocks[0..{}]", cfg.token_blocks)),
            100,
            false,
        )?,
        lora: Some(crate::bench::bench_lora(
            &bb,
            Some(SiteSelector::One(format!(
                "transformer_blocks[0..{}]",
                cfg.token_blocks
            ))),
        )?),
        warmup: cfg.warmup,
        iters: cfg.iters,
    };
    time_cases(&inputs, &mut report)
}
