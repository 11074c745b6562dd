//! A model to sample from: a backbone (from a model folder or a recipe's `[backbone]`), an
//! optional adapter file, and which of its token sets guidance uses. Shared by `sample`, `eval`
//! and `demo`.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use softalign_backbones::model_folder::locate;
use softalign_core::adapter::{load_adapter, Adapter, TokenSelection};
use softalign_core::backbone::Backbone;
use softalign_core::plugin::{BackboneSpec, BuildContext};
use tch::Device;

use super::build::Built;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ModelArgs {
    /// A model folder (diffusers-style), or a Hugging Face hub id (`org/name`) found in the
    /// local hub cache (HF_HOME / HF_HUB_CACHE; nothing is downloaded). Its type comes from
    /// `--backbone`, or else from
    /// `model_index.json`: a `softalign_backbone` key, or the pipeline class
    /// (`SoftalignShapesPipeline`: shapes, `StableDiffusion3*`: sd3, other `StableDiffusion*`
    /// pipelines, SD 1.x / 2.x / SDXL: unet).
    #[arg(long, conflicts_with = "recipe")]
    pub model: Option<PathBuf>,
    /// With a hub id as `--model`: the branch, tag or commit in the hub cache (default main).
    #[arg(long, requires = "model")]
    pub revision: Option<String>,
    /// Or a recipe whose `[backbone]` table names the model.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// The backbone plugin that reads `--model` (e.g. `shapes`).
    #[arg(long)]
    pub backbone: Option<String>,
    /// Soft tokens (an adapter file written by `softalign train`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The adapter's token set used in both guidance branches (default: `positive` where the
    /// adapter has one, as AGSM samples, else its first set).
    #[arg(long)]
    pub token_set: Option<String>,
    /// Use the adapter's EMA copy of that set.
    #[arg(long)]
    pub ema: bool,
    /// A LoRA file or folder (PEFT, diffusers, attention-processor .bin, kohya) merged into
    /// the weights at load, optionally scaled: `--lora style.safetensors:0.8` (repeatable;
    /// stacked in order, after the recipe's `[backbone] loras`).
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    pub loras: Vec<String>,
    /// A UNet folder (`config.json` + weights) in place of `--model`'s own, for SD1.5 / SDXL
    /// folders: how Diffusion-DPO releases its tuned models.
    #[arg(long, requires = "model")]
    pub unet: Option<PathBuf>,
}

/// Merges `--lora` files into a loaded backbone.
pub fn merge_loras(backbone: &dyn Backbone, loras: &[String]) -> anyhow::Result<()> {
    let refs = loras
        .iter()
        .map(|s| softalign_core::adapter::lora::merge::LoraRef::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    softalign_core::adapter::lora::merge::merge_all(backbone, &refs, Path::new("."))
        .context("merging --lora")
}

pub struct Model {
    pub backbone: Box<dyn Backbone>,
    pub adapters: Vec<Box<dyn Adapter>>,
    /// The tokens both guidance branches use; `None`: no adapter.
    pub selection: Option<TokenSelection>,
    /// The model folder's scheduler/scheduler_config.json (sampler settings), where it has one.
    pub scheduler_config: Option<serde_json::Value>,
    /// The recipe's resolved `[sampler]` table when the model came from `--recipe`: the
    /// default sampling settings, which command-line flags override.
    pub recipe_sampler: Option<serde_json::Value>,
}

/// `scheduler/scheduler_config.json` of a pipeline folder, if present.
pub fn scheduler_config(dir: &Path) -> anyhow::Result<Option<serde_json::Value>> {
    let path = dir.join("scheduler").join("scheduler_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    Ok(Some(softalign_core::json_file::read_value(&path)?))
}

/// The backbone type of a model folder, from its `model_index.json`.
pub fn detect_backbone(dir: &Path) -> anyhow::Result<String> {
    let index = dir.join("model_index.json");
    if !index.is_file() {
        bail!(
            "{}: cannot tell the model type without model_index.json; pass --backbone",
            dir.display()
        );
    }
    let json = softalign_core::json_file::read_value(&index)?;
    if let Some(kind) = json.get("softalign_backbone").and_then(|v| v.as_str()) {
        return Ok(kind.to_string());
    }
    match json.get("_class_name").and_then(|v| v.as_str()) {
        Some(c) if c.starts_with("StableDiffusion3") => Ok("sd3".into()),
        // StableDiffusionPipeline, StableDiffusionXLPipeline and their img2img / inpaint
        // siblings all denoise with a UNet2DConditionModel.
        Some(c) if c.starts_with("StableDiffusion") => Ok("unet".into()),
        Some("SoftalignShapesPipeline") => Ok("shapes".into()),
        Some(c) => bail!(
            "{}: pipeline class `{c}` has no known backbone; pass --backbone",
            index.display()
        ),
        None => bail!("{}: no `_class_name`; pass --backbone", index.display()),
    }
}

/// The backbone type `ModelArgs` name, known before any weights load: `--backbone`, the
/// folder's model_index.json, or the recipe's `[backbone] type`.
pub fn backbone_kind(a: &ModelArgs) -> anyhow::Result<String> {
    match (&a.model, &a.recipe, &a.backbone) {
        (Some(_), _, Some(k)) => Ok(k.clone()),
        (Some(dir), _, None) => detect_backbone(&model_dir(dir, a.revision.as_deref())?),
        (None, Some(recipe), _) => {
            let loaded = softalign_core::recipe::load(recipe, &[])?;
            Ok(loaded.json["backbone"]["type"]
                .as_str()
                .unwrap_or_default()
                .to_string())
        }
        (None, None, _) => bail!("give a model: --model DIR or --recipe FILE"),
    }
}

/// The folder `--model` names: a path, or a hub id's snapshot in the local hub cache.
pub fn model_dir(dir: &Path, revision: Option<&str>) -> anyhow::Result<PathBuf> {
    Ok(locate(&BuildContext::cpu("."), dir, revision)?)
}

/// Builds a backbone spec `{type, path}` for a model folder; plugins that read folders take a
/// `path` field.
pub fn folder_spec(kind: &str, dir: &Path) -> anyhow::Result<Box<dyn BackboneSpec>> {
    let json = serde_json::json!({ "type": kind, "path": dir });
    serde_json::from_value(json)
        .with_context(|| format!("backbone `{kind}` cannot be built from a folder path"))
}

impl Model {
    pub fn load(a: &ModelArgs) -> anyhow::Result<Model> {
        let mut recipe_sampler = None;
        let (backbone, folder) = match (&a.model, &a.recipe) {
            (Some(dir), None) => {
                let dir = &model_dir(dir, a.revision.as_deref())?;
                let kind = match &a.backbone {
                    Some(k) => k.clone(),
                    None => detect_backbone(dir)?,
                };
                let ctx = BuildContext {
                    device: Device::cuda_if_available(),
                    recipe_dir: PathBuf::from("."),
                    dtype_override: None,
                    empty_prompt: Default::default(),
                };
                let spec = match &a.unet {
                    None => folder_spec(&kind, dir)?,
                    Some(unet) if kind == "unet" => {
                        let json = serde_json::json!({ "type": kind, "path": dir, "unet": unet });
                        serde_json::from_value(json).context("--unet")?
                    }
                    Some(_) => bail!(
                        "--unet replaces the UNet of an SD1.5 / SDXL folder; {} is a `{kind}` model",
                        dir.display()
                    ),
                };
                let b = spec
                    .build(&ctx)
                    .with_context(|| format!("loading the model {}", dir.display()))?;
                (b, Some(dir.clone()))
            }
            (None, Some(recipe)) => {
                let built = Built::new(recipe, &[], None, false)?;
                let folder = built.model_folder();
                recipe_sampler = built.sampler_table().cloned();
                (built.backbone, folder)
            }
            _ => bail!("give a model: --model DIR or --recipe FILE"),
        };
        merge_loras(backbone.as_ref(), &a.loras)?;
        let mut adapters = Vec::new();
        let mut selection = None;
        if let Some(path) = &a.adapter {
            let ad = load_adapter(path, backbone.info(), backbone.device())
                .with_context(|| format!("loading the adapter {}", path.display()))?;
            let sets = ad.token_sets();
            let set = match &a.token_set {
                Some(s) if sets.contains(s) => s.clone(),
                Some(s) => bail!(
                    "{}: no token set `{s}` (it has: {})",
                    path.display(),
                    sets.join(", ")
                ),
                None if sets.iter().any(|s| s == "positive") => "positive".into(),
                None => sets
                    .first()
                    .cloned()
                    .with_context(|| format!("{}: the adapter has no token set", path.display()))?,
            };
            if a.ema && !ad.has_ema() {
                bail!(
                    "{}: --ema given but the adapter keeps no EMA copy",
                    path.display()
                );
            }
            selection = Some(TokenSelection::new(Some(set), a.ema));
            adapters.push(ad);
        } else if a.token_set.is_some() || a.ema {
            bail!("--token-set and --ema need an --adapter");
        }
        let scheduler_config = match &folder {
            Some(dir) => scheduler_config(dir)?,
            None => None,
        };
        Ok(Model {
            backbone,
            adapters,
            selection,
            scheduler_config,
            recipe_sampler,
        })
    }

    /// What the model is, for logs and reports.
    pub fn describe(&self) -> String {
        let kind = &self.backbone.info().kind;
        match &self.selection {
            None => format!("{kind} (no adapter)"),
            Some(s) => format!(
                "{kind} + tokens `{}`{}",
                s.set.as_deref().unwrap_or("-"),
                if s.ema { " (EMA)" } else { "" }
            ),
        }
    }
}
