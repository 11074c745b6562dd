//! `softalign loss`: a dry run of a recipe's objectives on one fixed batch file, printing every
//! term and the weighted total as JSON, so a researcher can check a new objective on known data.
use std::path::PathBuf;

use anyhow::bail;
use softalign_objectives::batch::read_batch;
use softalign_objectives::{evaluate, StepOptions};

use super::build::Built;

#[derive(clap::Args)]
pub struct Args {
    /// The recipe file.
    #[arg(long)]
    pub recipe: PathBuf,
    /// A safetensors file with `x0` (B,C,H,W), `noise` (C,H,W) or (B,C,H,W), `timestep` (the
    /// 0..999 step, shape () or (1,)) and the caption conditioning named as the backbone's
    /// forward arguments (caption i belongs to image i).
    #[arg(long)]
    pub batch: PathBuf,
    /// Run the bare backbone (AGSM's EMA predictions then equal the online ones).
    #[arg(long)]
    pub no_adapter: bool,
    /// Seed for the adapters' initialisation (default: the recipe's).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Override a value: `--set objective.0.temperature=0.1` (repeatable), as for `train`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let b = Built::new(&a.recipe, &a.set, a.seed, !a.no_adapter)?;
    if b.objectives.is_empty() {
        bail!("recipe {}: names no [[objective]]", b.loaded.path.display());
    }
    let Built {
        loaded,
        device,
        backbone,
        adapters,
        objectives,
        ..
    } = b;
    let r = &loaded.recipe;
    let inputs = read_batch(&a.batch, backbone.info(), device)?;
    let images = inputs.x0.size()[0];
    let timestep = inputs.timestep.double_value(&[0]);
    let opts = StepOptions {
        pairs_per_forward: r.train.pairs_per_forward,
        backward: None,
    };
    let adapter_slice = (!adapters.is_empty()).then_some(adapters.as_slice());
    let res = evaluate(backbone.as_ref(), adapter_slice, &objectives, inputs, &opts)?;
    let terms: serde_json::Map<String, serde_json::Value> = res
        .terms
        .iter()
        .map(|(n, v)| (n.clone(), serde_json::json!(v)))
        .collect();
    let weights: serde_json::Map<String, serde_json::Value> = objectives
        .iter()
        .map(|o| (o.name().to_string(), serde_json::json!(o.weight())))
        .collect();
    let out = serde_json::json!({
        "terms": terms,
        "weights": weights,
        "total": res.total,
        "images": images,
        "timestep": timestep,
        "adapter": !a.no_adapter,
        "forwards": res.forwards,
        "recipe_hash": loaded.hash,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
