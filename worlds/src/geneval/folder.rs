//! GenEval's image folder layout:
//! ```text
//! <root>/00000/metadata.jsonl      the prompt's metadata line (one JSON object)
//! <root>/00000/samples/0000.png    its samples
//! ```
//! Folder names are the prompt's index in `evaluation_metadata.jsonl`, zero-padded to 5.
use std::path::{Path, PathBuf};

use image::RgbImage;

use super::metadata::EvalPrompt;
use crate::error::{Error, Result};

/// `<root>/<index:05>`.
pub fn prompt_dir(root: &Path, index: usize) -> PathBuf {
    root.join(format!("{index:05}"))
}

/// Writes one prompt's folder: its metadata and `samples/NNNN.png` for each image.
pub fn write_prompt_samples(
    root: &Path,
    index: usize,
    prompt: &EvalPrompt,
    images: &[RgbImage],
) -> Result<PathBuf> {
    let dir = prompt_dir(root, index);
    let samples = dir.join("samples");
    std::fs::create_dir_all(&samples).map_err(|e| Error::io(&samples, e))?;
    let meta = dir.join("metadata.jsonl");
    std::fs::write(&meta, prompt.to_json_line() + "\n").map_err(|e| Error::io(&meta, e))?;
    for (i, img) in images.iter().enumerate() {
        let path = samples.join(format!("{i:04}.png"));
        img.save_with_format(&path, image::ImageFormat::Png)
            .map_err(|source| Error::Image { path, source })?;
    }
    Ok(dir)
}

/// Writes a whole generation folder: `images[i]` are the samples of `prompts[i]`.
pub fn write_geneval_folder(
    root: &Path,
    prompts: &[EvalPrompt],
    images: &[Vec<RgbImage>],
) -> Result<()> {
    if prompts.len() != images.len() {
        return Err(Error::Invalid(format!(
            "{}: {} prompts but {} sample lists",
            root.display(),
            prompts.len(),
            images.len()
        )));
    }
    for (i, (p, imgs)) in prompts.iter().zip(images).enumerate() {
        write_prompt_samples(root, i, p, imgs)?;
    }
    Ok(())
}

/// One prompt folder as found on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptFolder {
    pub index: usize,
    pub dir: PathBuf,
    pub prompt: EvalPrompt,
    /// `samples/<digits>.png`, in numeric order.
    pub samples: Vec<PathBuf>,
}

/// Reads a generation folder the way GenEval's evaluator walks it: subfolders whose names are
/// all digits, each with `metadata.jsonl` and `samples/<digits>.png`; anything else (a
/// `grid.png`, stray files) is ignored. Sorted by index.
pub fn read_geneval_folder(root: &Path) -> Result<Vec<PromptFolder>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
        let entry = entry.map_err(|e| Error::io(root, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        if !dir.is_dir() || name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let index: usize = name
            .parse()
            .map_err(|_| Error::Invalid(format!("{}: folder index too large", dir.display())))?;
        let meta = dir.join("metadata.jsonl");
        let text = std::fs::read_to_string(&meta).map_err(|e| Error::io(&meta, e))?;
        // GenEval reads this file with json.load: one object, possibly without a newline.
        let prompt: EvalPrompt =
            serde_json::from_str(text.trim()).map_err(|e| Error::parse(&meta, 1, e))?;
        prompt.validate().map_err(|e| Error::parse(&meta, 1, e))?;
        let sdir = dir.join("samples");
        let mut samples: Vec<(u64, PathBuf)> = Vec::new();
        for s in std::fs::read_dir(&sdir).map_err(|e| Error::io(&sdir, e))? {
            let s = s.map_err(|e| Error::io(&sdir, e))?;
            let fname = s.file_name().to_string_lossy().into_owned();
            let Some(stem) = fname.strip_suffix(".png") else {
                continue;
            };
            if stem.is_empty() || !stem.bytes().all(|b| b.is_ascii_digit()) || !s.path().is_file() {
                continue;
            }
            samples.push((stem.parse().unwrap_or(u64::MAX), s.path()));
        }
        samples.sort();
        out.push(PromptFolder {
            index,
            dir,
            prompt,
            samples: samples.into_iter().map(|(_, p)| p).collect(),
        });
    }
    out.sort_by_key(|f| f.index);
    Ok(out)
}
