//! The `preference_pairs` dataset: prompts with a preferred and a rejected image (Pick-a-Pic
//! style, what Diffusion-DPO trains on). JSONL, one `{"prompt": ..., "preferred": "a.png",
//! "rejected": "b.png"}` per line, image paths relative to the JSONL file. A batch of N pairs
//! holds 2N images, the N preferred first and then the N rejected, each half captioned with
//! the same N prompts (see `Batch::preference_pairs`).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::captioned::preprocess;
use super::{Batch, Dataset};
use crate::plugin::{BuildContext, DatasetSpec};
use crate::{register_plugin, Error, Result};

/// One preference: the prompt, the image people (or a judge) preferred, the other one.
#[derive(Debug, Clone)]
pub struct Pair {
    pub prompt: String,
    pub preferred: PathBuf,
    pub rejected: PathBuf,
    /// 1-based line of the JSONL file, for messages.
    pub line: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    prompt: String,
    preferred: String,
    rejected: String,
}

/// Reads the JSONL file; every listed image must exist (errors name the file and line).
pub fn read_pairs(path: &Path) -> Result<Vec<Pair>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    let root = path.parent().unwrap_or(Path::new("."));
    let mut pairs = Vec::new();
    for (k, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| Error::file(path, format!("line {}: {msg}", k + 1));
        let l: Line = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
        let image = |field: &str, rel: &str| -> Result<PathBuf> {
            let p = root.join(rel);
            if p.is_file() {
                Ok(p)
            } else {
                Err(at(format!("`{field}` image {} not found", p.display())))
            }
        };
        pairs.push(Pair {
            preferred: image("preferred", &l.preferred)?,
            rejected: image("rejected", &l.rejected)?,
            prompt: l.prompt,
            line: k + 1,
        });
    }
    if pairs.is_empty() {
        return Err(Error::file(path, "lists no preference pairs"));
    }
    Ok(pairs)
}

pub struct PreferencePairs {
    file: PathBuf,
    pairs: Vec<Pair>,
    resolution: u32,
}

impl PreferencePairs {
    pub fn new(file: PathBuf, pairs: Vec<Pair>, resolution: u32) -> Result<Self> {
        if resolution == 0 {
            return Err(Error::Recipe(
                "data preference_pairs: `resolution` must be positive".into(),
            ));
        }
        Ok(Self {
            file,
            pairs,
            resolution,
        })
    }

    fn image(&self, pair: &Pair, path: &Path) -> Result<Tensor> {
        preprocess::load_square(path, self.resolution)
            .map(|img| preprocess::to_tensor(&img))
            .map_err(|e| Error::file(&self.file, format!("line {}: {e}", pair.line)))
    }
}

impl Dataset for PreferencePairs {
    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn images_per_sample(&self) -> usize {
        2
    }

    /// An unreadable image stops the run with its path and line: dropping one side of a pair
    /// silently would change what the preference says.
    fn batch(&self, indices: &[usize], device: Device) -> Result<Batch> {
        let mut preferred = Vec::with_capacity(indices.len());
        let mut rejected = Vec::with_capacity(indices.len());
        let mut prompts = Vec::with_capacity(2 * indices.len());
        for &i in indices {
            let pair = self.pairs.get(i).ok_or_else(|| {
                Error::invalid(format!(
                    "data preference_pairs {}: index {i} past the end ({} pairs)",
                    self.file.display(),
                    self.pairs.len()
                ))
            })?;
            preferred.push(self.image(pair, &pair.preferred)?);
            rejected.push(self.image(pair, &pair.rejected)?);
            prompts.push(pair.prompt.clone());
        }
        prompts.extend_from_within(..);
        preferred.extend(rejected);
        let mut batch = Batch::encoded(
            Tensor::stack(&preferred, 0).to_device(device),
            Default::default(),
        );
        batch.captions = Some(prompts);
        batch.preference_pairs = true;
        Ok(batch)
    }
}

fn default_resolution() -> u32 {
    512
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferencePairsSpec {
    /// JSONL: `{"prompt": "...", "preferred": "a.png", "rejected": "b.png"}` per line.
    pub path: PathBuf,
    /// Side of the square training images.
    #[serde(default = "default_resolution")]
    pub resolution: u32,
}

register_plugin!(
    PREFERENCE_PAIRS_ENTRY,
    Dataset,
    "preference_pairs",
    "Prompts with a preferred and a rejected image (JSONL), for diffusion_dpo",
    r#"[data]
type = "preference_pairs"
path = "data/pairs.jsonl"   # {"prompt": ..., "preferred": "a.png", "rejected": "b.png"}
resolution = 512
"#
);

#[typetag::serde(name = "preference_pairs")]
impl DatasetSpec for PreferencePairsSpec {
    fn validate(&self, ctx: &BuildContext) -> Result<()> {
        let p = ctx.resolve(&self.path);
        if !p.is_file() {
            return Err(Error::file(&p, "data preference_pairs: file not found"));
        }
        read_pairs(&p)?;
        if self.resolution == 0 {
            return Err(Error::Recipe(
                "data preference_pairs: `resolution` must be positive".into(),
            ));
        }
        Ok(())
    }

    fn image_size(&self) -> Option<(i64, i64)> {
        Some((self.resolution as i64, self.resolution as i64))
    }

    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Dataset>> {
        let p = ctx.resolve(&self.path);
        let pairs = read_pairs(&p)?;
        Ok(Box::new(PreferencePairs::new(p, pairs, self.resolution)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    #[test]
    fn batches_put_the_preferred_half_first_and_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (name, shade) in [("w.png", 255u8), ("l.png", 0)] {
            RgbImage::from_pixel(8, 8, Rgb([shade, shade, shade]))
                .save(d.join(name))
                .unwrap();
        }
        let m = d.join("pairs.jsonl");
        std::fs::write(
            &m,
            "{\"prompt\": \"a\", \"preferred\": \"w.png\", \"rejected\": \"l.png\"}\n\n\
             {\"prompt\": \"b\", \"preferred\": \"l.png\", \"rejected\": \"w.png\"}\n",
        )
        .unwrap();
        let data = PreferencePairs::new(m.clone(), read_pairs(&m).unwrap(), 8).unwrap();
        assert_eq!((data.len(), data.images_per_sample()), (2, 2));
        let b = data.batch(&[1, 0], Device::Cpu).unwrap();
        assert!(b.preference_pairs);
        assert_eq!(b.x0.size(), [4, 3, 8, 8]);
        assert_eq!(b.captions.unwrap(), ["b", "a", "b", "a"]);
        // preferred of pair 1 (black), preferred of pair 0 (white), then the rejected ones.
        let corner: Vec<f64> = (0..4).map(|i| b.x0.double_value(&[i, 0, 0, 0])).collect();
        assert_eq!(corner, [-1.0, 1.0, 1.0, -1.0]);

        std::fs::write(
            &m,
            "{\"prompt\": \"a\", \"preferred\": \"w.png\", \"rejected\": \"l.png\"}\n\
             {\"prompt\": \"b\", \"preferred\": \"w.png\", \"rejected\": \"gone.png\"}\n",
        )
        .unwrap();
        let err = read_pairs(&m).unwrap_err().to_string();
        assert!(
            err.contains("pairs.jsonl") && err.contains("line 2") && err.contains("gone.png"),
            "{err}"
        );
        std::fs::write(&m, "{\"prompt\": \"a\", \"preferred\": \"w.png\"}\n").unwrap();
        let err = read_pairs(&m).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("rejected"), "{err}");
    }
}
