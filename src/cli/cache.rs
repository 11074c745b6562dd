//! `softalign cache`: encodes a recipe's raw dataset once (VAE posterior, every caption's
//! conditioning) into the folder its `[data] type = "encoded_cache"` table names. Resumes an
//! interrupted run; refuses a folder made with other encoders or data.
use std::path::PathBuf;

use anyhow::{bail, Context};
use softalign_core::cache::{human_bytes, write_cache, write_cache_sharded, CacheRequest};

use super::build::Built;

#[derive(clap::Args)]
pub struct Args {
    /// A recipe whose `[data]` is an `encoded_cache` (its `source` is what gets encoded).
    #[arg(long)]
    pub recipe: PathBuf,
    /// Override a recipe value (`--set data.path=cache/other`, repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Samples per encoder call.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let built = Built::new(&a.recipe, &a.set, None, false)?;
    let recipe = &built.loaded.recipe;
    let data = recipe
        .data
        .as_ref()
        .with_context(|| format!("recipe {}: no [data] table", a.recipe.display()))?;
    let Some(cache) = data.encoding_cache() else {
        bail!(
            "recipe {}: [data] is not an `encoded_cache`; name one (path + source) to cache into",
            a.recipe.display()
        );
    };
    let source = cache
        .source
        .build(&built.ctx)
        .context("opening the dataset to encode")?;
    let Some(captioned) = source.as_captioned() else {
        bail!(
            "recipe {}: data.source must be a captioned image dataset (coco, image_manifest)",
            a.recipe.display()
        );
    };
    let dir = built.ctx.resolve(&cache.path);
    let req = CacheRequest {
        dir: &dir,
        backbone: built.backbone.as_ref(),
        data: captioned,
        source: cache.source_json(),
        captions_per_sample: cache.captions_per_sample,
        float_dtype: cache.dtype,
        compact: cache.compact,
        batch: a.batch,
        progress: !a.quiet,
    };
    // Under torchrun or srun the ranks encode one block of samples each, then rank 0 merges.
    let group = softalign_distributed::from_env(built.device)?;
    let main = group.as_ref().is_none_or(|g| g.launch().rank == 0);
    let req = CacheRequest {
        progress: req.progress && main,
        ..req
    };
    let s = match &group {
        None => write_cache(&req),
        Some(g) => write_cache_sharded(&req, g),
    }
    .with_context(|| format!("caching into {}", dir.display()))?;
    if !main {
        return Ok(());
    }
    let new = s.samples - s.resumed_at;
    eprintln!(
        "cached {} samples into {} ({} new{}, {} unreadable) in {:.1} s ({:.2} samples/s); \
         {} per sample, {} in all",
        s.samples,
        dir.display(),
        new,
        if s.resumed_at > 0 {
            format!(", resumed at {}", s.resumed_at)
        } else {
            String::new()
        },
        s.unreadable,
        s.seconds,
        new as f64 / s.seconds.max(1e-9),
        human_bytes(s.record_bytes as f64),
        human_bytes((s.record_bytes * s.samples) as f64),
    );
    Ok(())
}
