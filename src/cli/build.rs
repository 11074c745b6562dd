//! Building a recipe's runtime objects (backbone, adapters, objectives, data), shared by the
//! commands that run a recipe.
use std::path::Path;

use anyhow::{bail, Context};
use softalign_core::adapter::Adapter;
use softalign_core::backbone::{Backbone, BackboneInfo};
use softalign_core::objective::Objective;
use softalign_core::plugin::BuildContext;
use softalign_core::recipe::{self, LoadedRecipe};
use softalign_core::train::config::TrainMode;
use softalign_core::train::precision::freeze_in_dtype;
use softalign_core::train::seed::seed_everything;
use softalign_objectives::ObjectiveTask;
use tch::Device;

pub struct Built {
    pub loaded: LoadedRecipe,
    pub info: BackboneInfo,
    pub device: Device,
    pub ctx: BuildContext,
    pub backbone: Box<dyn Backbone>,
    pub adapters: Vec<Box<dyn Adapter>>,
    pub objectives: Vec<Box<dyn Objective>>,
}

impl Built {
    /// Loads and checks the recipe, seeds every generator with `seed` (default: the recipe's),
    /// then builds the backbone (frozen), the adapters (unless `with_adapters` is false) and the
    /// objectives.
    pub fn new(
        recipe_path: &Path,
        sets: &[String],
        seed: Option<u64>,
        with_adapters: bool,
    ) -> anyhow::Result<Self> {
        let loaded = recipe::load(recipe_path, sets)?;
        let info = recipe::check(&loaded)?;
        let r = &loaded.recipe;
        let device = r.train.device.resolve()?;
        let ctx = BuildContext {
            device,
            recipe_dir: loaded.dir.clone(),
            dtype_override: None,
        };
        seed_everything(seed.unwrap_or(r.seed));
        let backbone = r.backbone.build(&ctx).context("building the backbone")?;
        let adapters = if with_adapters {
            r.adapter
                .iter()
                .map(|s| s.build(&info, &ctx))
                .collect::<Result<_, _>>()
                .context("building the adapters")?
        } else {
            Vec::new()
        };
        let objectives = r
            .objective
            .iter()
            .map(|o| o.build())
            .collect::<Result<_, _>>()
            .context("building the objectives")?;
        Ok(Self {
            loaded,
            info,
            device,
            ctx,
            backbone,
            adapters,
            objectives,
        })
    }

    /// As [`Built::new`], with the training precision policy applied: the backbone's weights in
    /// `train.weights_dtype` and frozen (adapter mode), or trainable in fp32 (full mode).
    pub fn for_training(recipe_path: &Path, sets: &[String]) -> anyhow::Result<Self> {
        let mut b = Self::new(recipe_path, sets, None, true)?;
        let train = &b.loaded.recipe.train;
        if b.objectives.is_empty() {
            bail!(
                "recipe {}: names no [[objective]] to train with",
                b.loaded.path.display()
            );
        }
        if train.mode == TrainMode::Adapter {
            if b.adapters.is_empty() {
                bail!(
                    "recipe {}: train.mode = \"adapter\" but the recipe names no [[adapter]]",
                    b.loaded.path.display()
                );
            }
            freeze_in_dtype(b.backbone.var_store_mut(), train.weights_dtype);
        }
        Ok(b)
    }

    /// The trainer's task: the objectives on the recipe's `[data]`.
    pub fn into_task(self) -> anyhow::Result<ObjectiveTask> {
        let r = &self.loaded.recipe;
        let data = r.data.as_ref().with_context(|| {
            format!(
                "recipe {}: training needs a [data] table",
                self.loaded.path.display()
            )
        })?;
        let dataset = data.build(&self.ctx).context("opening the training data")?;
        let mut task = ObjectiveTask::new(
            self.backbone,
            self.adapters,
            self.objectives,
            dataset,
            r.train.clone(),
        )?;
        task.export_metadata
            .insert("recipe_hash".into(), self.loaded.hash.clone());
        task.export_metadata
            .insert("backbone".into(), self.info.kind.clone());
        Ok(task)
    }
}
