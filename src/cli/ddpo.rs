//! Building the DDPO trainer task from a recipe with a `[ddpo]` table: its prompts, the
//! recipe's `[reward]`, and the sampler resolved as `sample` resolves it (the model folder's
//! noise schedule, the recipe's `[sampler]` for the rest).
use std::path::Path;

use anyhow::{bail, Context};
use softalign_core::adapter::TokenSelection;
use softalign_core::reward::RewardPrompt;
use softalign_objectives::{DdpoParts, DdpoTask};

use super::build::Built;
use super::generate::{resolve, GenSettings};
use super::model::scheduler_config;

/// The built-in prompt list of `ddpo.prompts`.
const SHAPES_TRAIN: &str = "shapes:train";

/// `ddpo.prompts`: `shapes:train`, a GenEval metadata file (`.jsonl`) or a text file.
pub fn read_prompts(spec: &str, recipe_dir: &Path) -> anyhow::Result<Vec<RewardPrompt>> {
    let with_meta = |p: softalign_worlds::geneval::EvalPrompt| -> anyhow::Result<RewardPrompt> {
        Ok(RewardPrompt {
            text: p.prompt.clone(),
            metadata: Some(serde_json::to_value(&p)?),
        })
    };
    if spec == SHAPES_TRAIN {
        return softalign_worlds::shapes::prompts::train_prompts(0)
            .into_iter()
            .map(with_meta)
            .collect();
    }
    let path = softalign_core::recipe::paths::absolute(Path::new(spec), recipe_dir);
    if path.extension().is_some_and(|e| e == "jsonl") {
        return softalign_worlds::geneval::read_metadata_jsonl(&path)?
            .into_iter()
            .map(with_meta)
            .collect();
    }
    if !path.is_file() {
        bail!(
            "ddpo.prompts = \"{spec}\": no such file ({}); give `{SHAPES_TRAIN}`, a GenEval \
             evaluation_metadata.jsonl or a text file of prompts",
            path.display()
        );
    }
    Ok(super::sample::read_prompts(&path)?
        .into_iter()
        .map(|text| RewardPrompt {
            text,
            metadata: None,
        })
        .collect())
}

impl Built {
    /// The trainer's task for a recipe with `[ddpo]`.
    pub fn into_ddpo_task(self) -> anyhow::Result<DdpoTask> {
        let r = &self.loaded.recipe;
        let path = self.loaded.path.display();
        let config = r
            .ddpo
            .clone()
            .with_context(|| format!("recipe {path}: no [ddpo] table"))?;
        let reward = r
            .reward
            .as_ref()
            .with_context(|| format!("recipe {path}: DDPO needs a [reward] table"))?
            .build(&self.ctx)
            .context("building the reward")?;
        let prompts = read_prompts(&config.prompts, &self.loaded.dir)
            .with_context(|| format!("recipe {path}: reading ddpo.prompts"))?;
        let scheduler = match self.model_folder() {
            Some(dir) => scheduler_config(&dir)?,
            None => None,
        };
        let resolved = resolve(
            &GenSettings::default(),
            self.backbone.info().prediction,
            scheduler.as_ref(),
            self.sampler_table(),
        )
        .with_context(|| format!("recipe {path}: the DDPO sampler"))?;
        // The tokens of the first set (`positive` where there is one) in both branches, as
        // `sample` uses a trained adapter; LoRA has no sets and acts everywhere.
        let sets: Vec<String> = self.adapters.iter().flat_map(|a| a.token_sets()).collect();
        let set = sets
            .iter()
            .find(|s| *s == "positive")
            .or(sets.first())
            .cloned();
        let selection = TokenSelection::new(set, false);
        let mut task = DdpoTask::new(
            self.backbone,
            self.adapters,
            DdpoParts {
                reward,
                sampler: resolved.sampler,
                guidance: resolved.guidance,
                selection,
                prompts,
                config,
            },
            &r.train,
        )?;
        eprintln!("ddpo: sampling with {}", resolved.description);
        task.export_metadata
            .insert("recipe_hash".into(), self.loaded.hash.clone());
        task.export_metadata
            .insert("backbone".into(), self.info.kind.clone());
        Ok(task)
    }
}
