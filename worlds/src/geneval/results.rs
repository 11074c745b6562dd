//! GenEval's `results.jsonl`: one line per image with the columns its evaluator writes
//! (filename, tag, prompt, correct, reason, metadata, details). `metadata` and `details` are
//! JSON strings inside the JSON line, as in GenEval, so its `summary_scores.py` reads our
//! files and our summary reads theirs.
use std::io::Write;
use std::path::Path;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::folder::read_geneval_folder;
use super::judge::Judgement;
use super::metadata::{EvalPrompt, Tag};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageResult {
    pub filename: String,
    pub tag: Tag,
    pub prompt: String,
    pub correct: bool,
    pub reason: String,
    /// The prompt's metadata line, as Python's `json.dumps` writes it.
    pub metadata: String,
    /// Detections that counted: `{"class": [[x0, y0, x1, y1, confidence], ...]}`.
    #[serde(default)]
    pub details: String,
}

impl ImageResult {
    pub fn new(filename: &Path, prompt: &EvalPrompt, judgement: &Judgement) -> Self {
        ImageResult {
            filename: filename.to_string_lossy().into_owned(),
            tag: prompt.tag,
            prompt: prompt.prompt.clone(),
            correct: judgement.correct,
            reason: judgement.reason.clone(),
            metadata: prompt.to_json_line(),
            details: judgement.details_json(),
        }
    }

    /// The prompt metadata this result was judged against.
    pub fn parsed_metadata(&self) -> Result<EvalPrompt> {
        serde_json::from_str(&self.metadata).map_err(|e| {
            Error::Invalid(format!(
                "result for {}: bad metadata string: {e}",
                self.filename
            ))
        })
    }
}

/// Scores every sample of a GenEval generation folder with `judge`.
pub fn score_folder_with(
    root: &Path,
    mut judge: impl FnMut(&RgbImage, &EvalPrompt) -> Judgement,
) -> Result<Vec<ImageResult>> {
    let mut out = Vec::new();
    for folder in read_geneval_folder(root)? {
        for path in &folder.samples {
            let img = image::open(path)
                .map_err(|source| Error::Image {
                    path: path.clone(),
                    source,
                })?
                .to_rgb8();
            let j = judge(&img, &folder.prompt);
            out.push(ImageResult::new(path, &folder.prompt, &j));
        }
    }
    Ok(out)
}

pub fn write_results_jsonl(path: &Path, results: &[ImageResult]) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut f = std::io::BufWriter::new(file);
    for r in results {
        let line = serde_json::to_string(r).expect("results serialise to JSON");
        writeln!(f, "{line}").map_err(|e| Error::io(path, e))?;
    }
    f.flush().map_err(|e| Error::io(path, e))
}

pub fn read_results_jsonl(path: &Path) -> Result<Vec<ImageResult>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::parse(path, i + 1, e)))
        .collect()
}
