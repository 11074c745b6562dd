//! Timing of the UNet forward and forward+backward, with and without soft tokens.

use softalign_core::backbone::{Conditioning, Prediction};
use softalign_core::dtype::DType;
use softalign_core::site::SiteSelector;
use softalign_core::{Error, Result};
use tch::{Device, Kind, Tensor};

use super::config::{PerBlock, UNetConfig};
use super::spec::{UNetBackbone, ENCODER_HIDDEN_STATES, TEXT_EMBEDS, TIME_IDS};
use crate::bench::{bench_tokens, time_cases, BenchInputs, BenchRow};
use crate::schedulers::ddpm::{BetaConfig, DdpmNoise};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub model: UNetConfig,
    pub batch: i64,
    /// Image side in pixels; the latent is 1/8 of it (the SD VAE).
    pub resolution: i64,
    pub text_len: i64,
    pub iters: usize,
    pub warmup: usize,
    pub device: Device,
    pub dtype: DType,
    pub tokens: i64,
    /// Block groups that get the soft tokens (`down`, `mid`, `up`).
    pub sites: Vec<String>,
}

impl BenchConfig {
    /// Sized for a 2-core CPU: the SD1.5 block layout at widths 32/64/128/128 (1 resnet per
    /// block, 4 heads), cross-attention 768 wide, 256 px, batch 4.
    pub fn small_cpu() -> Self {
        Self {
            model: UNetConfig {
                block_out_channels: vec![32, 64, 128, 128],
                layers_per_block: PerBlock::One(1),
                attention_head_dim: PerBlock::One(4),
                norm_num_groups: Some(16),
                ..UNetConfig::sd15()
            },
            batch: 4,
            resolution: 256,
            text_len: 77,
            iters: 5,
            warmup: 1,
            device: Device::Cpu,
            dtype: DType::F32,
            tokens: 4,
            sites: vec!["down".into()],
        }
    }
}

pub fn run(cfg: &BenchConfig, mut report: impl FnMut(&BenchRow)) -> Result<Vec<BenchRow>> {
    if cfg.resolution % 8 != 0 || cfg.batch <= 0 || cfg.iters == 0 || cfg.text_len < 1 {
        return Err(Error::invalid(
            "bench: resolution must be a multiple of 8, batch, iters and text length positive",
        ));
    }
    let dev = cfg.device;
    let noise = DdpmNoise::new(BetaConfig::default(), Prediction::Epsilon)?;
    let bb = UNetBackbone::random(&cfg.model, dev, cfg.dtype, noise)?;
    let m = &cfg.model;
    let cross = m.resolve()?.cross_attention_dim;
    let lat = cfg.resolution / 8;
    let kind = cfg.dtype.kind();
    let x = Tensor::randn([cfg.batch, m.in_channels, lat, lat], (kind, dev));
    let t = Tensor::randint(1000, [cfg.batch], (Kind::Int64, dev)).to_kind(Kind::Float);
    let mut cond = Conditioning::new().with(
        ENCODER_HIDDEN_STATES,
        Tensor::randn([cfg.batch, cfg.text_len, cross], (kind, dev)),
    );
    if let Some(p) = m.text_embeds_dim() {
        let r = cfg.resolution as f64;
        let ids = Tensor::from_slice(&[r, r, 0.0, 0.0, r, r])
            .to_kind(kind)
            .to_device(dev)
            .unsqueeze(0)
            .repeat([cfg.batch, 1]);
        cond = cond
            .with(TEXT_EMBEDS, Tensor::randn([cfg.batch, p], (kind, dev)))
            .with(TIME_IDS, ids);
    }
    let inputs = BenchInputs {
        backbone: &bb,
        x,
        t,
        cond,
        adapter: bench_tokens(
            &bb,
            cfg.tokens,
            SiteSelector::Many(cfg.sites.clone()),
            0,
            true,
        )?,
        lora: Some(crate::bench::bench_lora(&bb, None)?),
        warmup: cfg.warmup,
        iters: cfg.iters,
    };
    time_cases(&inputs, &mut report)
}
