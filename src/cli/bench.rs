//! `softalign bench`: MMDiT (or, with `--backbone unet`, UNet) forward and forward+backward
//! timings, with and without soft tokens and LoRA; with `--recipe`, a recipe's training step
//! and each of its objectives alone.
use anyhow::Context;
use softalign_backbones::bench::BenchRow;
use softalign_backbones::sd3::bench::{run as run_bench, BenchConfig};
use softalign_backbones::sd3::Sd3Config;
use softalign_core::dtype::{DType, DeviceSpec};

#[derive(clap::Args)]
pub struct Args {
    /// Time a recipe's training step instead (on its own model and data): all objectives,
    /// then each alone, forward + backward; the model options below are then ignored.
    #[arg(long)]
    pub recipe: Option<std::path::PathBuf>,
    /// With --recipe: override a recipe value (`--set train.images_per_step=4`, repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "recipe")]
    pub set: Vec<String>,
    /// `sd3` (MMDiT) or `unet` (SD1.5/SDXL UNet2DConditionModel).
    #[arg(long, default_value = "sd3")]
    pub backbone: String,
    /// A full-size config with random weights (sd3: sd3-medium, sd3.5-medium, sd3.5-large;
    /// unet: sd15, sdxl); default: a small model sized for a 2-core CPU (MMDiT 8 blocks of
    /// width 128; UNet with SD1.5's layout at widths 32..128).
    #[arg(long, conflicts_with = "config")]
    pub preset: Option<String>,
    /// A diffusers `config.json` (SD3Transformer2DModel or UNet2DConditionModel) to build with
    /// random weights instead of a preset: the same model a PyTorch side-by-side builds.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Also write the table as JSON (one object per case) to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// UNet only: block groups that get the soft tokens.
    #[arg(long, value_delimiter = ',', default_value = "down")]
    pub unet_sites: Vec<String>,
    /// Images per step (each is one (image, caption) pair).
    #[arg(long, default_value_t = 4)]
    pub batch: i64,
    /// Image side in pixels (latent = resolution / 8).
    #[arg(long, default_value_t = 256)]
    pub resolution: i64,
    /// Text context length (SD3 default: 77 CLIP + 256 T5 = 333).
    #[arg(long, default_value_t = 77)]
    pub text_len: i64,
    /// Timed iterations per case (cases run round-robin; the median is reported).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Soft tokens per block.
    #[arg(long, default_value_t = 4)]
    pub tokens: i64,
    /// Soft tokens go into blocks 0..N.
    #[arg(long, default_value_t = 5)]
    pub token_blocks: i64,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Torch intra-op threads (default: torch's choice). On a shared, busy CPU, 1 gives far
    /// steadier (and often faster) figures than oversubscribed OpenMP threads.
    #[arg(long)]
    pub threads: Option<i32>,
    /// Under torchrun / srun: time the data-parallel gradient all-reduce instead, on flat f32
    /// gradients of these sizes in MB (comma-separated), in the trainer's buckets.
    #[arg(long, value_delimiter = ',', value_name = "MB,...")]
    pub allreduce: Vec<f64>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if let Some(n) = a.threads {
        tch::set_num_threads(n);
    }
    if !a.allreduce.is_empty() {
        return super::bench_allreduce::run(&a.allreduce, &a.device, a.iters, a.warmup);
    }
    if let Some(recipe) = &a.recipe {
        return super::bench_recipe::run(recipe, &a.set, a.iters, a.warmup);
    }
    match a.backbone.as_str() {
        "sd3" => {}
        "unet" => return super::bench_unet::run(a),
        other => anyhow::bail!("--backbone: unknown `{other}` (sd3, unet)"),
    }
    let mut cfg = BenchConfig::small_cpu();
    if let Some(p) = &a.preset {
        cfg.model = Sd3Config::preset(p).context("--preset")?;
    }
    if let Some(f) = &a.config {
        cfg.model = Sd3Config::from_file(f).context("--config")?;
    }
    cfg.batch = a.batch;
    cfg.resolution = a.resolution;
    cfg.text_len = a.text_len;
    cfg.iters = a.iters;
    cfg.warmup = a.warmup;
    cfg.tokens = a.tokens;
    cfg.token_blocks = a.token_blocks;
    cfg.dtype = DType::parse(&a.dtype).context("--dtype")?;
    cfg.device = DeviceSpec::parse(&a.device)
        .and_then(|d| d.resolve())
        .context("--device")?;
    let m = &cfg.model;
    println!(
        "MMDiT: {} blocks, width {}, {} heads{}{} | batch {}, {} px (latent {}), text {} | {:?} {:?} | tokens {} x blocks 0..{}",
        m.num_layers,
        m.inner_dim(),
        m.num_attention_heads,
        if m.qk_norm.is_some() { ", qk-norm" } else { "" },
        if m.dual_attention_layers.is_empty() { "" } else { ", dual attention" },
        cfg.batch,
        cfg.resolution,
        cfg.resolution / 8,
        cfg.text_len,
        cfg.dtype,
        cfg.device,
        cfg.tokens,
        cfg.token_blocks
    );
    print_header();
    let rows = run_bench(&cfg, print_row)?;
    print_overheads(&rows, cfg.device);
    write_json(a.json.as_deref(), &rows)
}

/// `--json`: the rows as `[{case, ms_per_step, pairs_per_s, host_peak_mib}]`, for scripts
/// that put softalign beside another implementation.
pub fn write_json(path: Option<&std::path::Path>, rows: &[BenchRow]) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    let v: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "case": r.case,
                "ms_per_step": r.ms_per_step,
                "pairs_per_s": r.pairs_per_s,
                "host_peak_mib": r.host_peak_mib,
            })
        })
        .collect();
    std::fs::write(path, serde_json::to_string_pretty(&v)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// The table's header line (every backbone's bench prints the same table).
pub fn print_header() {
    println!(
        "{:<38} {:>12} {:>10} {:>16}",
        "case", "ms/step", "pairs/s", "host peak MiB"
    );
}

pub fn print_row(r: &BenchRow) {
    println!(
        "{:<38} {:>12.1} {:>10.2} {:>16}",
        r.case,
        r.ms_per_step,
        r.pairs_per_s,
        r.host_peak_mib
            .map_or("n/a".to_string(), |m| format!("{m:.0}"))
    );
}

/// Each adapter's cost relative to the bare model, per sampling and training step.
pub fn print_overheads(rows: &[BenchRow], device: tch::Device) {
    let ms = |name: &str| rows.iter().find(|r| r.case == name).map(|r| r.ms_per_step);
    for (what, base, with) in [
        (
            "soft tokens, sampling step",
            "sampling step: forward",
            "sampling step: + soft tokens",
        ),
        (
            "soft tokens, training step",
            "training step: fwd+bwd (to input)",
            "training step: + soft tokens",
        ),
        (
            "LoRA unmerged, sampling step",
            "sampling step: forward",
            "sampling step: + LoRA unmerged",
        ),
        (
            "LoRA unmerged, training step",
            "training step: fwd+bwd (to input)",
            "training step: + LoRA unmerged",
        ),
        (
            "LoRA merged, sampling step",
            "sampling step: forward",
            "sampling step: LoRA merged",
        ),
    ] {
        if let (Some(a), Some(b)) = (ms(base), ms(with)) {
            println!("{what} overhead: {:+.1}%", (b / a - 1.0) * 100.0);
        }
    }
    if matches!(device, tch::Device::Cuda(_)) {
        println!("(GPU memory: tch exposes no CUDA allocator statistics; host peak shown)");
    }
}
