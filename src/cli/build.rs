//! Building a recipe's runtime objects (backbone, adapters, objectives, data), shared by the
//! commands that run a recipe.
use std::path::Path;

use anyhow::{bail, Context};
use softalign_core::adapter::prompt_init::EmptyPromptRows;
use softalign_core::adapter::Adapter;
use softalign_core::backbone::{Backbone, BackboneInfo};
use softalign_core::objective::Objective;
use softalign_core::plugin::BuildContext;
use softalign_core::recipe::{self, LoadedRecipe, Purpose};
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
        Self::from_loaded(recipe::load(recipe_path, sets)?, seed, with_adapters)
    }

    /// [`Built::new`] for a recipe already loaded. Without adapters only what the backbone
    /// side uses is checked (`cache` never builds the adapters, so their sites need not fit).
    pub fn from_loaded(
        loaded: LoadedRecipe,
        seed: Option<u64>,
        with_adapters: bool,
    ) -> anyhow::Result<Self> {
        let purpose = if with_adapters {
            Purpose::Train
        } else {
            Purpose::Backbone
        };
        let info = recipe::check_for(&loaded, purpose)?;
        let r = &loaded.recipe;
        // Under torchrun or srun each rank takes its own GPU.
        let device = softalign_distributed::device_for_rank(r.train.device.resolve()?)?;
        let mut ctx = BuildContext {
            device,
            recipe_dir: loaded.dir.clone(),
            dtype_override: None,
            empty_prompt: Default::default(),
        };
        seed_everything(seed.unwrap_or(r.seed));
        let backbone = r.backbone.build(&ctx).context("building the backbone")?;
        if with_adapters {
            // Adapters that start from the empty prompt's encoding get it from the backbone.
            ctx.empty_prompt = EmptyPromptRows::compute(backbone.as_ref(), &r.adapter)
                .context("building the adapters")?;
        }
        let adapters = if with_adapters {
            r.adapter
                .iter()
                .map(|s| {
                    let mut a = s.build(&info, &ctx)?;
                    a.bind_weights(backbone.var_store())?;
                    Ok(a)
                })
                .collect::<softalign_core::Result<_>>()
                .context("building the adapters")?
        } else {
            Vec::new()
        };
        let objectives = r
            .objective
            .iter()
            .map(|o| o.build_in(&ctx))
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
        let loaded = recipe::load(recipe_path, sets)?;
        // What training needs besides a valid recipe, refused before any weights load (and
        // so before a run folder exists).
        let r = &loaded.recipe;
        let path = loaded.path.display();
        // DDPO samples its own data (`recipe::check` refuses objectives and data beside it).
        let ddpo = r.ddpo.is_some();
        if !ddpo && r.objective.is_empty() {
            bail!("recipe {path}: names no [[objective]] to train with");
        }
        if !ddpo && r.data.is_none() {
            bail!(
                "recipe {path}: training needs a [data] table (`softalign list --examples` \
                 shows the dataset types)"
            );
        }
        if r.train.mode == TrainMode::Adapter && r.adapter.is_empty() {
            bail!("recipe {path}: train.mode = \"adapter\" but the recipe names no [[adapter]]");
        }
        let mut b = Self::from_loaded(loaded, None, true)?;
        if b.loaded.recipe.train.mode == TrainMode::Adapter {
            let dtype = b.loaded.recipe.train.weights_dtype;
            freeze_in_dtype(b.backbone.var_store_mut(), dtype);
            // DoRA magnitudes start at the rows of the weights as training will see them.
            for a in &mut b.adapters {
                a.bind_weights(b.backbone.var_store())?;
            }
        }
        Ok(b)
    }

    /// The model folder the recipe's `[backbone] path` names, resolved.
    pub fn model_folder(&self) -> Option<std::path::PathBuf> {
        self.loaded
            .json
            .get("backbone")
            .and_then(|b| b.get("path"))
            .and_then(|p| p.as_str())
            .map(|p| self.ctx.resolve(Path::new(p)))
    }

    /// The recipe's resolved `[sampler]` table, if it has one.
    pub fn sampler_table(&self) -> Option<&serde_json::Value> {
        self.loaded.json.get("sampler").filter(|v| !v.is_null())
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
