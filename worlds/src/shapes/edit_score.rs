//! Scoring an edited image against its [`EditTask`], exactly:
//! - **target**: the scorer's verdict on the target prompt (GenEval's rules);
//! - **kept**: every bystander (a source object the edit must not touch) is still detected,
//!   same shape and colour above the scorer's threshold, in a box overlapping its source box
//!   with IoU >= [`KEEP_IOU`];
//! - **pixel distance**: the mean absolute RGB difference (0..1) between the edited and the
//!   source image outside the edit's region: the boxes of the edited objects in the source and
//!   the ground truth, and of any detection of an edited object's new kind in the edited image
//!   (an added or moved object may land elsewhere than the ground truth put it), each grown by
//!   [`REGION_MARGIN`] px for anti-aliased and blurred rims.
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::edits::EditTask;
use super::scorer::{detect, score_image_with, ScorerConfig};
use crate::geneval::Detection;

/// Overlap with its source box at which a bystander counts as kept where it was: GenEval's
/// and COCO's usual match threshold.
pub const KEEP_IOU: f32 = 0.5;

/// Pixels added around every box of the edit region.
pub const REGION_MARGIN: f32 = 2.0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditScore {
    pub target_correct: bool,
    /// The scorer's reason for its verdict on the target prompt.
    pub reason: String,
    pub bystanders: usize,
    pub kept: usize,
    /// Mean |edited - source| over the RGB values outside the edit region, 0..1; `None` when
    /// the region covers the whole image.
    pub pixel_distance: Option<f64>,
    /// Fraction of the image outside the edit region.
    pub outside_fraction: f64,
}

impl EditScore {
    pub fn all_kept(&self) -> bool {
        self.kept == self.bystanders
    }
    /// The edit did what the target asks and left every bystander in place.
    pub fn success(&self) -> bool {
        self.target_correct && self.all_kept()
    }
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let ix = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let iy = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = ix * iy;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Scores `edited` (the same size as the task's source) for `task`, `source` being the
/// rendered source image the edit started from.
pub fn score_edit(
    task: &EditTask,
    source: &RgbImage,
    edited: &RgbImage,
    cfg: &ScorerConfig,
) -> EditScore {
    let judgement = score_image_with(edited, &task.target_prompt, cfg);
    let found: Vec<Detection> = detect(edited, cfg)
        .into_iter()
        .filter(|d| d.confidence > cfg.judge.threshold)
        .collect();
    let bystanders = task.bystanders();
    let kept = bystanders
        .iter()
        .filter(|&&i| {
            let o = &task.source.objects[i];
            found.iter().any(|d| {
                d.class == o.shape.name()
                    && d.color == o.color.name()
                    && iou(&d.bbox, &o.bbox()) >= KEEP_IOU
            })
        })
        .count();
    let scale = edited.width() as f32 / task.source.image_size.max(1) as f32;
    let mut region: Vec<[f32; 4]> = Vec::new();
    for &i in &task.edited {
        region.push(task.source.objects[i].bbox().map(|v| v * scale));
    }
    for &i in &task.target_edited {
        let o = &task.target.objects[i];
        region.push(o.bbox().map(|v| v * scale));
        region.extend(
            found
                .iter()
                .filter(|d| d.class == o.shape.name() && d.color == o.color.name())
                .map(|d| d.bbox),
        );
    }
    let (w, h) = edited.dimensions();
    let (mut sum, mut n) = (0.0f64, 0usize);
    for y in 0..h {
        for x in 0..w {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let inside = region.iter().any(|r| {
                px >= r[0] - REGION_MARGIN
                    && px <= r[2] + REGION_MARGIN
                    && py >= r[1] - REGION_MARGIN
                    && py <= r[3] + REGION_MARGIN
            });
            if inside {
                continue;
            }
            let (a, b) = (edited.get_pixel(x, y).0, source.get_pixel(x, y).0);
            for c in 0..3 {
                sum += (a[c] as f64 - b[c] as f64).abs() / 255.0;
            }
            n += 1;
        }
    }
    EditScore {
        target_correct: judgement.correct,
        reason: judgement.reason,
        bystanders: bystanders.len(),
        kept,
        pixel_distance: (n > 0).then(|| sum / (3 * n) as f64),
        outside_fraction: n as f64 / (w * h) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::edits::edit_tasks;
    use crate::shapes::render::render;

    #[test]
    fn ground_truth_scores_perfectly_and_the_source_fails_the_target() {
        let cfg = ScorerConfig::default();
        for t in edit_tasks(3, 5).unwrap() {
            let src = render(&t.source, 32);
            let truth = score_edit(&t, &src, &render(&t.target, 32), &cfg);
            assert!(truth.success(), "{t:?}: {truth:?}");
            assert_eq!(truth.pixel_distance, Some(0.0), "{t:?}");
            let unedited = score_edit(&t, &src, &src, &cfg);
            assert!(!unedited.target_correct && unedited.all_kept(), "{t:?}");
        }
    }

    #[test]
    fn a_blank_image_keeps_nothing() {
        let cfg = ScorerConfig::default();
        let t = &edit_tasks(0, 1).unwrap()[0];
        let src = render(&t.source, 32);
        let blank = RgbImage::from_pixel(32, 32, image::Rgb(super::super::BACKGROUND));
        let s = score_edit(t, &src, &blank, &cfg);
        assert!(!s.target_correct && s.kept == 0, "{s:?}");
        assert!(s.pixel_distance.unwrap() > 0.0);
    }
}
