//! The differentiable count: per image and class, the sum over the detections NMS kept of
//! sigmoid((score - threshold) / temperature). NMS runs at a candidate threshold below the
//! count threshold, so a detection just under the threshold is kept and can be pushed over it
//! (or a counted one pushed under): the gradient reaches the image through the kept
//! detections' class scores. As the temperature goes to 0 the soft count becomes the hard
//! count of detections scoring above `threshold`, which is ultralytics' count at conf =
//! threshold (greedy NMS keeps the same boxes above a threshold whatever it keeps below it).
use tch::{Kind, Tensor};

use super::nms::Kept;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CountOptions {
    /// The score at which a detection counts one half.
    pub threshold: f64,
    pub temperature: f64,
}

/// Soft counts [B, nc] from the raw output [B, 4 + nc, A] (with its graph) and each image's
/// kept detections.
pub fn soft_counts(raw: &Tensor, kept: &[Vec<Kept>], opts: &CountOptions) -> Result<Tensor> {
    let s = raw.size();
    if s.len() != 3 || s[1] < 5 || s[0] != kept.len() as i64 {
        return Err(Error::tensor(
            "detector output",
            format!(
                "shape {s:?} for {} images, expected [B, 4 + classes, anchors]",
                kept.len()
            ),
        ));
    }
    if !(opts.temperature > 0.0 && opts.temperature.is_finite()) {
        return Err(Error::invalid(format!(
            "soft count temperature must be positive (got {})",
            opts.temperature
        )));
    }
    let (b, rows, a) = (s[0], s[1], s[2]);
    let nc = rows - 4;
    let mut src = Vec::new();
    let mut dst = Vec::new();
    for (img, dets) in kept.iter().enumerate() {
        let img = img as i64;
        for d in dets {
            src.push((img * rows + 4 + d.class as i64) * a + d.anchor);
            dst.push(img * nc + d.class as i64);
        }
    }
    let kind = match raw.kind() {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    };
    let counts = Tensor::zeros([b * nc], (kind, raw.device()));
    if src.is_empty() {
        return Ok(counts.view([b, nc]));
    }
    let dev = raw.device();
    let scores = raw
        .to_kind(kind)
        .reshape([-1])
        .index_select(0, &Tensor::from_slice(&src).to_device(dev));
    let soft = ((scores - opts.threshold) / opts.temperature).sigmoid();
    Ok(counts
        .index_add(0, &Tensor::from_slice(&dst).to_device(dev), &soft)
        .view([b, nc]))
}

/// Hard counts [B][nc]: kept detections scoring above `threshold`.
pub fn hard_counts(kept: &[Vec<Kept>], classes: usize, threshold: f64) -> Vec<Vec<u32>> {
    kept.iter()
        .map(|dets| {
            let mut c = vec![0u32; classes];
            for d in dets {
                if f64::from(d.score) > threshold {
                    c[d.class] += 1;
                }
            }
            c
        })
        .collect()
}
