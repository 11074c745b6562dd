//! A researcher's own objective, outside the crates: a hinge that asks each image's matched
//! caption to beat the mean mismatched one by `margin` in denoising error. Registering it
//! takes a spec, a runtime and two attributes; a recipe then names it with `type = "margin"`.
//!
//!     cargo run --example margin_objective -- examples/margin.toml BATCH.safetensors \
//!         --set backbone.path=/models/sd3-medium
use serde::{Deserialize, Serialize};
use softalign_core::adapter::TokenSelection;
use softalign_core::objective::{Objective, Pairs, PredictionRequest, StepView, Term};
use softalign_core::plugin::{BuildContext, ObjectiveSpec};
use softalign_core::{register_plugin, Result};
use tch::Tensor;

extern crate softalign_backbones; // links the `sd3` backbone plugin

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MarginSpec {
    weight: f64,
    margin: f64,
}

register_plugin!(
    MARGIN,
    Objective,
    "margin",
    "Hinge: matched error + margin < mean mismatched error",
    "[[objective]]\ntype = \"margin\"\nweight = 1.0\nmargin = 0.01\n"
);

#[typetag::serde(name = "margin")]
impl ObjectiveSpec for MarginSpec {
    fn validate(&self) -> Result<()> {
        Ok(())
    }
    fn build(&self) -> Result<Box<dyn Objective>> {
        Ok(Box::new(self.clone()))
    }
}

impl Objective for MarginSpec {
    fn name(&self) -> &str {
        "margin"
    }
    fn weight(&self) -> f64 {
        self.weight
    }
    fn requests(&self) -> Vec<PredictionRequest> {
        // The same request as the contrastive loss: used together, they share one forward.
        vec![PredictionRequest {
            pairs: Pairs::All,
            tokens: TokenSelection::default(),
            grad: true,
        }]
    }
    fn terms(&self, step: &dyn StepView) -> Result<Vec<Term>> {
        let b = step.images();
        let p = step.predictions(&TokenSelection::default(), true)?;
        let err =
            (step.target().unsqueeze(1) - p)
                .square()
                .mean_dim(&[2i64, 3, 4][..], false, None);
        let eye = Tensor::eye(b, (err.kind(), err.device()));
        let pos = (&err * &eye).sum_dim_intlist(1, false, None);
        let neg = (&err * (eye.ones_like() - &eye)).sum_dim_intlist(1, false, None)
            / (b - 1).max(1) as f64;
        let value = (pos - neg + self.margin).relu().mean(None);
        Ok(vec![Term {
            name: "margin".into(),
            value,
        }])
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [recipe, batch, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: margin_objective RECIPE BATCH [--set k=v]...");
    };
    let sets: Vec<String> = rest.iter().filter(|a| *a != "--set").cloned().collect();
    let loaded = softalign_core::recipe::load(recipe.as_ref(), &sets)?;
    let info = softalign_core::recipe::check(&loaded)?;
    let r = &loaded.recipe;
    let ctx = BuildContext {
        device: r.train.device.resolve()?,
        ..BuildContext::cpu(&loaded.dir)
    };
    tch::manual_seed(r.seed as i64);
    let backbone = r.backbone.build(&ctx)?;
    let adapters = r
        .adapter
        .iter()
        .map(|a| a.build(&info, &ctx))
        .collect::<Result<Vec<_>>>()?;
    let objectives = r
        .objective
        .iter()
        .map(|o| o.build())
        .collect::<Result<Vec<_>>>()?;
    let inputs = softalign_objectives::batch::read_batch(batch.as_ref(), &info, ctx.device)?;
    let opts = softalign_objectives::StepOptions::default();
    let res = softalign_objectives::evaluate(
        backbone.as_ref(),
        Some(&adapters),
        &objectives,
        inputs,
        &opts,
    )?;
    println!(
        "{}",
        serde_json::json!({ "terms": res.terms, "total": res.total, "forwards": res.forwards })
    );
    Ok(())
}
