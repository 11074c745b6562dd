//! The `encoded_cache` dataset plugin: a recipe names the cache folder and the raw dataset it
//! encodes; `softalign cache` fills the folder, `softalign train` reads it.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::layout::{Manifest, StoredDType, MANIFEST};
use super::reader::EncodedCache;
use crate::dataset::Dataset;
use crate::plugin::{BuildContext, DatasetSpec};
use crate::{register_plugin, Error, Result};

fn default_captions() -> usize {
    5
}

fn default_dtype() -> StoredDType {
    StoredDType::Bf16
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodedCacheSpec {
    /// The cache folder.
    pub path: PathBuf,
    /// The raw dataset the cache encodes (`coco`, `image_manifest`).
    pub source: Box<dyn DatasetSpec>,
    /// Captions kept per sample (COCO has five; extra ones are dropped).
    #[serde(default = "default_captions")]
    pub captions_per_sample: usize,
    /// Storage type of the encoded floats: bf16 (default) or f32.
    #[serde(default = "default_dtype")]
    pub dtype: StoredDType,
    /// Probability of training on the empty caption's encoding instead.
    #[serde(default)]
    pub caption_dropout: f64,
    /// Store the backbone's compact conditioning (SD3: the context after the frozen
    /// context_embedder, 1536 instead of 4096 wide for SD3-medium).
    #[serde(default)]
    pub compact: bool,
}

register_plugin!(
    ENCODED_CACHE_ENTRY,
    Dataset,
    "encoded_cache",
    "A dataset encoded once by `softalign cache` (latents + text conditioning, bf16, mmap)",
    r#"[data]
type = "encoded_cache"
path = "cache/coco-sd3"
source = { type = "coco", annotations = "coco/annotations/captions_train2017.json", images = "coco/train2017" }
"#
);

impl EncodedCacheSpec {
    /// The source spec as recorded in a manifest.
    pub fn source_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.source).expect("dataset specs serialise")
    }
}

#[typetag::serde(name = "encoded_cache")]
impl DatasetSpec for EncodedCacheSpec {
    fn validate(&self, ctx: &BuildContext) -> Result<()> {
        if !matches!(self.dtype, StoredDType::Bf16 | StoredDType::F32) {
            return Err(Error::Recipe(format!(
                "data encoded_cache: `dtype` must be bf16 or f32, got {:?}",
                self.dtype
            )));
        }
        if self.captions_per_sample == 0 || self.captions_per_sample > 255 {
            return Err(Error::Recipe(format!(
                "data encoded_cache: `captions_per_sample` must be 1..=255, got {}",
                self.captions_per_sample
            )));
        }
        // The source need not exist once the cache does.
        if !ctx.resolve(&self.path).join(MANIFEST).is_file() {
            self.source.validate(ctx)?;
        }
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Dataset>> {
        let dir = ctx.resolve(&self.path);
        let cache = EncodedCache::open(&dir, self.caption_dropout)?;
        check_settings(cache.manifest(), self, &dir)?;
        Ok(Box::new(cache))
    }

    fn encoding_cache(&self) -> Option<&EncodedCacheSpec> {
        Some(self)
    }

    fn image_size(&self) -> Option<(i64, i64)> {
        self.source.image_size()
    }
}

fn check_settings(m: &Manifest, spec: &EncodedCacheSpec, dir: &std::path::Path) -> Result<()> {
    let mut r = Vec::new();
    if m.source != spec.source_json() {
        r.push(format!(
            "made from {}, the recipe names {}",
            m.source,
            spec.source_json()
        ));
    }
    if m.captions_per_sample != spec.captions_per_sample {
        r.push(format!(
            "{} captions per sample, the recipe says {}",
            m.captions_per_sample, spec.captions_per_sample
        ));
    }
    if m.compact != spec.compact {
        r.push(format!(
            "compact = {}, the recipe says {}",
            m.compact, spec.compact
        ));
    }
    if m.float_dtype != spec.dtype {
        r.push(format!(
            "stored as {:?}, the recipe says {:?}",
            m.float_dtype, spec.dtype
        ));
    }
    if r.is_empty() {
        Ok(())
    } else {
        Err(Error::file(
            dir,
            format!("stale encoding cache: {}", r.join("; ")),
        ))
    }
}
