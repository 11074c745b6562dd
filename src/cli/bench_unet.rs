//! `softalign bench --backbone unet`: UNet forward and forward+backward timings, with and
//! without soft tokens after BOS in the chosen block groups.
use anyhow::Context;
use softalign_backbones::unet::bench::{run as run_bench, BenchConfig};
use softalign_backbones::unet::UNetConfig;
use softalign_core::dtype::{DType, DeviceSpec};

use super::bench::Args;

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut cfg = BenchConfig::small_cpu();
    if let Some(p) = &a.preset {
        cfg.model = UNetConfig::preset(p).context("--preset")?;
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
    println!(
        "{:<24} {:>12} {:>10} {:>16}",
        "case", "ms/step", "pairs/s", "host peak MiB"
    );
    let rows = run_bench(&cfg, |r| {
        println!(
            "{:<24} {:>12.1} {:>10.2} {:>16}",
            r.case,
            r.ms_per_step,
            r.pairs_per_s,
            r.host_peak_mib
                .map_or("n/a".to_string(), |m| format!("{m:.0}"))
        );
    })?;
    let ms = |name: &str| rows.iter().find(|r| r.case == name).map(|r| r.ms_per_step);
    if let (Some(a), Some(b)) = (ms("forward"), ms("forward + soft tokens")) {
        println!(
            "soft-token overhead, forward: {:+.1}%",
            (b / a - 1.0) * 100.0
        );
    }
    if let (Some(a), Some(b)) = (ms("fwd+bwd (to input)"), ms("fwd+bwd + soft tokens")) {
        println!(
            "soft-token overhead, fwd+bwd: {:+.1}%",
            (b / a - 1.0) * 100.0
        );
    }
    Ok(())
}
