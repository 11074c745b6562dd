//! The `coco` and `image_manifest` dataset plugins.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{coco, manifest, CaptionedImages};
use crate::dataset::Dataset;
use crate::plugin::{BuildContext, DatasetSpec};
use crate::{register_plugin, Error, Result};

fn default_resolution() -> u32 {
    512
}

/// What `CaptionedImages::new` refuses, checked without reading images.
fn check_sampling(kind: &str, resolution: u32, caption_dropout: f64) -> Result<()> {
    if resolution == 0 {
        return Err(Error::Recipe(format!(
            "data {kind}: `resolution` must be positive"
        )));
    }
    if !(0.0..1.0).contains(&caption_dropout) {
        return Err(Error::Recipe(format!(
            "data {kind}: `caption_dropout` must be in [0, 1), got {caption_dropout}"
        )));
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CocoSpec {
    /// `annotations/captions_train2017.json`.
    pub annotations: PathBuf,
    /// The image folder the file names are relative to (`train2017/`).
    pub images: PathBuf,
    /// Side of the square training images (the reference: 512 for every backbone).
    #[serde(default = "default_resolution")]
    pub resolution: u32,
    /// Probability of training on the empty caption instead.
    #[serde(default)]
    pub caption_dropout: f64,
}

register_plugin!(
    COCO_ENTRY,
    Dataset,
    "coco",
    "COCO captions (captions_*.json + image folder): a random caption of five per access",
    r#"[data]
type = "coco"
annotations = "coco/annotations/captions_train2017.json"
images = "coco/train2017"
resolution = 512
"#
);

#[typetag::serde(name = "coco")]
impl DatasetSpec for CocoSpec {
    fn validate(&self, ctx: &BuildContext) -> Result<()> {
        let ann = ctx.resolve(&self.annotations);
        if !ann.is_file() {
            return Err(Error::file(&ann, "data coco: annotations file not found"));
        }
        let img = ctx.resolve(&self.images);
        if !img.is_dir() {
            return Err(Error::file(&img, "data coco: image folder not found"));
        }
        check_sampling("coco", self.resolution, self.caption_dropout)
    }

    fn image_size(&self) -> Option<(i64, i64)> {
        Some((self.resolution as i64, self.resolution as i64))
    }

    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Dataset>> {
        self.validate(ctx)?;
        let ann = ctx.resolve(&self.annotations);
        let (entries, uncaptioned) = coco::read(&ann, &ctx.resolve(&self.images))?;
        if uncaptioned > 0 {
            eprintln!(
                "note: data coco {}: {uncaptioned} images have no caption and are left out",
                ann.display()
            );
        }
        let origin = format!("coco {}", ann.display());
        Ok(Box::new(CaptionedImages::new(
            origin,
            entries,
            self.resolution,
            self.caption_dropout,
        )?))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestSpec {
    /// JSONL: `{"image": "relative/or/absolute.jpg", "captions": ["...", ...]}` per line.
    pub path: PathBuf,
    #[serde(default = "default_resolution")]
    pub resolution: u32,
    #[serde(default)]
    pub caption_dropout: f64,
}

register_plugin!(
    MANIFEST_ENTRY,
    Dataset,
    "image_manifest",
    "Images + captions listed in a JSONL manifest (one {image, captions} object per line)",
    r#"[data]
type = "image_manifest"
path = "data/train.jsonl"
resolution = 512
"#
);

#[typetag::serde(name = "image_manifest")]
impl DatasetSpec for ManifestSpec {
    fn validate(&self, ctx: &BuildContext) -> Result<()> {
        let p = ctx.resolve(&self.path);
        if !p.is_file() {
            return Err(Error::file(&p, "data image_manifest: file not found"));
        }
        // Read now, as training would: an empty or malformed manifest fails the check.
        manifest::read(&p)?;
        check_sampling("image_manifest", self.resolution, self.caption_dropout)
    }

    fn image_size(&self) -> Option<(i64, i64)> {
        Some((self.resolution as i64, self.resolution as i64))
    }

    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Dataset>> {
        let p = ctx.resolve(&self.path);
        let entries = manifest::read(&p)?;
        Ok(Box::new(CaptionedImages::new(
            format!("manifest {}", p.display()),
            entries,
            self.resolution,
            self.caption_dropout,
        )?))
    }
}
