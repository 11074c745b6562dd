//! `generation.json`: how a `sample` / `eval` folder was made (model, adapter, seed, sampler,
//! guidance, versions), so images found later can be traced and regenerated.
use std::path::Path;

use anyhow::Context;
use softalign_core::logging::run_dir::{device_description, libtorch_version};

use super::generate::GenSettings;
use super::model::{Model, ModelArgs};

pub const FILE: &str = "generation.json";

/// Writes `<out>/generation.json`.
pub fn write(
    out: &Path,
    command: &str,
    args: &ModelArgs,
    model: &Model,
    gen: &GenSettings,
    sampling: &str,
) -> anyhow::Result<()> {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let record = serde_json::json!({
        "command": command,
        "argv": std::env::args().collect::<Vec<_>>(),
        "model": args.model.as_deref().map(abs),
        "recipe": args.recipe.as_deref().map(abs),
        "backbone": model.backbone.info().kind,
        "adapter": args.adapter.as_deref().map(abs),
        "token_set": model.selection.as_ref().and_then(|s| s.set.clone()),
        "ema": args.ema,
        "seed": gen.seed,
        "images_per_prompt": gen.n,
        "height": gen.height,
        "width": gen.width,
        "sampling": sampling,
        "versions": {
            "softalign": env!("CARGO_PKG_VERSION"),
            "tch": "0.24.0",
            "libtorch": libtorch_version(),
            "device": device_description(model.backbone.device()),
        },
    });
    let path = out.join(FILE);
    let text = serde_json::to_string_pretty(&record).context("serialising the record")?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// "1 image", "2 images".
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
