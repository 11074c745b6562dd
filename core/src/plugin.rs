//! Plugin specs: the plain serde data a recipe holds for each `type = "..."` table. Each spec
//! validates itself without weights and builds the runtime object that holds tensors.
//! Plugins register with `#[typetag::serde(name = "...")]` and `register_plugin!`.
use std::fmt::Debug;
use std::path::{Path, PathBuf};

use tch::Device;

use crate::adapter::prompt_init::{EmptyPromptRows, PromptRowRequest};
use crate::adapter::Adapter;
use crate::backbone::{Backbone, BackboneInfo};
use crate::dataset::Dataset;
use crate::detector::Detector;
use crate::dtype::DType;
use crate::objective::Objective;
use crate::reward::Reward;
use crate::sampler::Sampler;
use crate::Result;

/// What building a plugin may depend on besides its own spec.
#[derive(Debug, Clone)]
pub struct BuildContext {
    pub device: Device,
    /// Relative paths in a recipe are resolved against its folder.
    pub recipe_dir: PathBuf,
    /// The command line's `--dtype` where given; otherwise the spec's own.
    pub dtype_override: Option<DType>,
    /// The empty prompt's encoding, for adapters that start from it (filled from the loaded
    /// backbone before the adapters are built; empty otherwise).
    pub empty_prompt: EmptyPromptRows,
}

impl BuildContext {
    pub fn cpu(recipe_dir: impl Into<PathBuf>) -> Self {
        Self {
            device: Device::Cpu,
            recipe_dir: recipe_dir.into(),
            dtype_override: None,
            empty_prompt: EmptyPromptRows::default(),
        }
    }
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.recipe_dir.join(p)
        }
    }
}

#[typetag::serde(tag = "type")]
pub trait BackboneSpec: Debug + Send + Sync {
    /// Kind, sites and conditioning, known without loading weights (a spec pointing at a folder
    /// reads its config.json).
    fn describe(&self, ctx: &BuildContext) -> Result<BackboneInfo>;
    /// Whether training images of `height` x `width` pixels fit the model, known without
    /// weights (SD3: multiples of the patch in pixels, within the positional table). The error
    /// states the rule in pixels.
    fn check_image_size(&self, ctx: &BuildContext, height: i64, width: i64) -> Result<()> {
        let _ = (ctx, height, width);
        Ok(())
    }
    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Backbone>>;
}

#[typetag::serde(tag = "type")]
pub trait AdapterSpec: Debug + Send + Sync {
    /// Named token sets this adapter provides, and whether each keeps an EMA copy.
    fn token_sets(&self) -> Vec<(String, bool)> {
        Vec::new()
    }
    fn validate(&self, backbone: &BackboneInfo) -> Result<()>;
    /// The files the adapter reads when built (an init embedding), opened and checked against
    /// the backbone without loading weights.
    fn check_files(&self, backbone: &BackboneInfo, ctx: &BuildContext) -> Result<()> {
        let _ = (backbone, ctx);
        Ok(())
    }
    /// The row of the empty prompt's encoding the adapter starts from, if any
    /// (`ctx.empty_prompt` holds it when `build` is called).
    fn empty_prompt_row(&self) -> Option<PromptRowRequest> {
        None
    }
    fn build(&self, backbone: &BackboneInfo, ctx: &BuildContext) -> Result<Box<dyn Adapter>>;
    /// Trainable parameters the adapter would have on `backbone` (online tensors of every
    /// set), known without weights; `recipe check` prints it.
    fn trainable_parameters(&self, backbone: &BackboneInfo) -> Result<Option<i64>> {
        let _ = backbone;
        Ok(None)
    }
}

#[typetag::serde(tag = "type")]
pub trait ObjectiveSpec: Debug + Send + Sync {
    fn validate(&self) -> Result<()>;
    /// Token sets the objective uses, and whether it needs their EMA copies; recipe checks
    /// that an adapter provides each.
    fn token_sets(&self) -> Vec<(String, bool)> {
        Vec::new()
    }
    /// The fewest images per micro-batch (`train.images_per_step`) the objective can learn
    /// from; recipe check refuses fewer (a contrastive loss over one image is constant).
    fn min_images_per_step(&self) -> i64 {
        1
    }
    /// Why fewer than [`ObjectiveSpec::min_images_per_step`] cannot work, for recipe check's
    /// message.
    fn min_images_reason(&self) -> &'static str {
        "the objective needs that many images in each micro-batch"
    }
    fn build(&self) -> Result<Box<dyn Objective>>;
    /// The files the objective reads when built (a detector), checked without loading them.
    fn check_files(&self, ctx: &BuildContext) -> Result<()> {
        let _ = ctx;
        Ok(())
    }
    /// `build` where the objective loads something of its own (a detector on the recipe's
    /// device, its path resolved against the recipe). Commands build objectives this way.
    fn build_in(&self, ctx: &BuildContext) -> Result<Box<dyn Objective>> {
        let _ = ctx;
        self.build()
    }
}

/// A detector an objective names (`detector = { type = "yolov8", file = "..." }`); its
/// runtime object gives the raw output convention of `detector::Detector`.
#[typetag::serde(tag = "type")]
pub trait DetectorSpec: Debug + Send + Sync {
    /// The files the detector reads, checked without loading weights.
    fn check_files(&self, ctx: &BuildContext) -> Result<()>;
    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Detector>>;
}

/// A reward for RL fine-tuning (`[reward]`): one score per generated image.
#[typetag::serde(tag = "type")]
pub trait RewardSpec: Debug + Send + Sync {
    /// What the reward reads (a model file), checked without loading it.
    fn validate(&self, ctx: &BuildContext) -> Result<()>;
    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Reward>>;
}

#[typetag::serde(tag = "type")]
pub trait SamplerSpec: Debug + Send + Sync {
    fn validate(&self) -> Result<()>;
    fn build(&self) -> Result<Box<dyn Sampler>>;
}

#[typetag::serde(tag = "type")]
pub trait DatasetSpec: Debug + Send + Sync {
    fn validate(&self, ctx: &BuildContext) -> Result<()>;
    /// (height, width) in pixels of the images the dataset yields, where fixed (checked
    /// against the backbone by recipe check).
    fn image_size(&self) -> Option<(i64, i64)> {
        None
    }
    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Dataset>>;
    /// The `encoded_cache` spec, which `softalign cache` fills.
    fn encoding_cache(&self) -> Option<&crate::cache::EncodedCacheSpec> {
        None
    }
}
