//! `softalign bench --backbone unet`: UNet forward and forward+backward timings, with and
//! without soft tokens after BOS in the chosen block groups.
use anyhow::Context;
use softalign_backbones::unet::bench::{run as run_bench, BenchConfig};
use softalign_backbones::unet::UNetConfig;
use softalign_core::dtype::{DType, DeviceSpec};

use super::bench::{print_header, print_overheads, print_row, write_json, Args};

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut cfg = BenchConfig::small_cpu();
    if let Some(p) = &a.preset {
        cfg.model = UNetConfig::preset(p).context("--preset")?;
    }
    if let Some(f) = &a.config {
        cfg.model = UNetConfig::from_file(f).context("--config")?;
    }
    if let Some(n) = a.threads {
        tch::set_num_threads(n);
    }
    cfg.batch = a.batch;
    cfg.resolution = a.resolution;
    cfg.text_len = a.text_len;
    cfg.iters = a.iters;
    cfg.warmup = a.warmup;
    cfg.tokens = a.tokens;
    cfg.sites = a.unet_sites.clone();
    cfg.dtype = DType::parse(&a.dtype).context("--dtype")?;
    cfg.device = DeviceSpec::parse(&a.device)
        .and_then(|d| d.resolve())
        .context("--device")?;
    let m = &cfg.model;
    println!(
        "UNet: channels {:?}, {} | batch {}, {} px (latent {}), text {} | {:?} {:?} | tokens {} in {}",
        m.block_out_channels,
        if m.has_text_time() { "text_time" } else { "SD1.x layout" },
        cfg.batch,
        cfg.resolution,
        cfg.resolution / 8,
        cfg.text_len,
        cfg.dtype,
        cfg.device,
        cfg.tokens,
        cfg.sites.join("+")
    );
    print_header();
    let rows = run_bench(&cfg, print_row)?;
    print_overheads(&rows, cfg.device);
    write_json(a.json.as_deref(), &rows)
}
