//! `softalign loss`: a dry run of a recipe's objectives on one fixed batch file, printing every
//! term and the weighted total as JSON, so a researcher can check a new objective on known data.
use std::path::PathBuf;

use anyhow::{bail, Context};
use softalign_core::adapter::Adapter;
use softalign_core::objective::Objective;
use softalign_core::plugin::BuildContext;
use softalign_objectives::batch::read_batch;
use softalign_objectives::{evaluate, StepOptions};

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
    let loaded = softalign_core::recipe::load(&a.recipe, &a.set)?;
    let info = softalign_core::recipe::check(&loaded)?;
    let r = &loaded.recipe;
    if r.objective.is_empty() {
        bail!("recipe {}: names no [[objective]]", loaded.path.display());
    }
    let device = r.train.device.resolve()?;
    let ctx = BuildContext {
        device,
        recipe_dir: loaded.dir.clone(),
        dtype_override: None,
    };
    tch::manual_seed(a.seed.unwrap_or(r.seed) as i64);
    let backbone = r.backbone.build(&ctx).context("building the backbone")?;
    let adapters: Vec<Box<dyn Adapter>> = if a.no_adapter {
        Vec::new()
    } else {
        r.adapter
            .iter()
            .map(|s| s.build(&info, &ctx))
            .collect::<Result<_, _>>()
            .context("building the adapters")?
    };
    let objectives: Vec<Box<dyn Objective>> = r
        .objective
        .iter()
        .map(|o| o.build())
        .collect::<Result<_, _>>()?;
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
