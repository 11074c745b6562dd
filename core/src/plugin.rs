//! Plugin specs: the plain serde data a recipe holds for each `type = "..."` table. Each spec
//! validates itself without weights and builds the runtime object that holds tensors.
//! Plugins register with `#[typetag::serde(name = "...")]` and `register_plugin!`.
use std::fmt::Debug;
use std::path::{Path, PathBuf};

use tch::Device;

use crate::adapter::Adapter;
use crate::backbone::{Backbone, BackboneInfo};
use crate::dataset::Dataset;
use crate::dtype::DType;
use crate::objective::Objective;
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
}

impl BuildContext {
    pub fn cpu(recipe_dir: impl Into<PathBuf>) -> Self {
        Self {
            device: Device::Cpu,
            recipe_dir: recipe_dir.into(),
            dtype_override: None,
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
    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Backbone>>;
}

#[typetag::serde(tag = "type")]
pub trait AdapterSpec: Debug + Send + Sync {
    /// Named token sets this adapter provides, and whether each keeps an EMA copy.
    fn token_sets(&self) -> Vec<(String, bool)> {
        Vec::new()
    }
    fn validate(&self, backbone: &BackboneInfo) -> Result<()>;
    fn build(&self, backbone: &BackboneInfo, ctx: &BuildContext) -> Result<Box<dyn Adapter>>;
}

#[typetag::serde(tag = "type")]
pub trait ObjectiveSpec: Debug + Send + Sync {
    fn validate(&self) -> Result<()>;
    /// Token sets the objective uses, and whether it needs their EMA copies; recipe checks
    /// that an adapter provides each.
    fn token_sets(&self) -> Vec<(String, bool)> {
        Vec::new()
    }
    fn build(&self) -> Result<Box<dyn Objective>>;
}

#[typetag::serde(tag = "type")]
pub trait SamplerSpec: Debug + Send + Sync {
    fn validate(&self) -> Result<()>;
    fn build(&self) -> Result<Box<dyn Sampler>>;
}

#[typetag::serde(tag = "type")]
pub trait DatasetSpec: Debug + Send + Sync {
    fn validate(&self, ctx: &BuildContext) -> Result<()>;
    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Dataset>>;
    /// The `encoded_cache` spec, which `softalign cache` fills.
    fn encoding_cache(&self) -> Option<&crate::cache::EncodedCacheSpec> {
        None
    }
}
