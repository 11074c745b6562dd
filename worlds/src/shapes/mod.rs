//! The shapes world: a synthetic text-to-image task with GenEval's six categories, judged
//! exactly. Images are 32 x 32 px, white, with 1 to 4 circles, squares, triangles or diamonds
//! in red, green, blue, yellow or purple.
pub mod captions;
pub mod edit_score;
pub mod edits;
pub mod heldout;
pub mod oracle;
pub mod palette;
pub mod prompts;
pub mod render;
pub mod scene;
pub mod scorer;
pub mod split;
pub mod vocab;

use std::path::Path;

pub use captions::captions;
pub use oracle::scene_for_prompt;
pub use palette::{Color, Shape, BACKGROUND};
pub use prompts::{eval_prompts, eval_prompts_with, names_held_out};
pub use render::{from_signed_chw, render, to_signed_chw};
pub use scene::{Object, Scene, SceneConfig};
pub use scorer::{detect, score_image, score_image_with, ScorerConfig};
pub use split::{train_example, train_split, train_split_with, TrainExample};
pub use vocab::vocabulary;

use crate::error::Result;
use crate::geneval::{score_folder_with, ImageResult, Summary};

/// Scores a GenEval generation folder with this world's scorer: per-image results (as in
/// GenEval's `results.jsonl`) and their summary.
pub fn score_folder(dir: &Path) -> Result<(Vec<ImageResult>, Summary)> {
    score_folder_cfg(dir, &ScorerConfig::default())
}

pub fn score_folder_cfg(dir: &Path, cfg: &ScorerConfig) -> Result<(Vec<ImageResult>, Summary)> {
    let results = score_folder_with(dir, |img, p| score_image_with(img, p, cfg))?;
    let summary = Summary::from_results(&results);
    Ok((results, summary))
}
