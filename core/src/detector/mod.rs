//! Object detectors on images, for objectives that count or locate what a model drew. A
//! detector takes RGB in [0, 1] at its own input size and returns the ultralytics YOLOv8 raw
//! output convention, [B, 4 + nc, A]: per anchor cx, cy, w, h in input pixels, then nc class
//! scores after a sigmoid (no objectness, no NMS). The letterbox, the NMS and the
//! differentiable soft count live here, so every detector in that convention shares them.
pub mod count;
pub mod letterbox;
pub mod nms;

use tch::{Device, Tensor};

use crate::Result;

pub use count::{hard_counts, soft_counts, CountOptions};
pub use letterbox::Letterbox;
pub use nms::{non_max_suppression, Kept, NmsOptions};

pub trait Detector: Send {
    /// The class names, in the order of the score rows (row 4 + c is class c).
    fn class_names(&self) -> &[String];
    /// (height, width) in pixels the network takes.
    fn input_size(&self) -> (i64, i64);
    fn device(&self) -> Device;
    /// Raw output [B, 4 + nc, A] for RGB inputs in [0, 1] of exactly `input_size()` (already
    /// letterboxed). Differentiable with respect to `images`.
    fn forward_raw(&self, images: &Tensor) -> Result<Tensor>;
    /// Where the detector's weights came from (shown by `softalign detect`).
    fn describe(&self) -> String;
}

/// The index of a class by name (exact, ASCII case-insensitive).
pub fn class_index(detector: &dyn Detector, name: &str) -> Option<usize> {
    detector
        .class_names()
        .iter()
        .position(|c| c.eq_ignore_ascii_case(name))
}

/// Letterboxes RGB images in [0, 1] of any size to the detector's input and runs it: the raw
/// output and the letterbox (to map boxes back to the images' pixels).
pub fn detect_raw(detector: &dyn Detector, images: &Tensor) -> Result<(Tensor, Letterbox)> {
    let s = images.size();
    if s.len() != 4 || s[1] != 3 {
        return Err(crate::Error::tensor(
            "images",
            format!("shape {s:?}, expected (B, 3, H, W) RGB in [0, 1]"),
        ));
    }
    let lb = Letterbox::new((s[2], s[3]), detector.input_size())?;
    let x = lb.apply(&images.to_device(detector.device()));
    let raw = detector.forward_raw(&x)?;
    let nc = detector.class_names().len() as i64;
    let r = raw.size();
    if r.len() != 3 || r[0] != s[0] || r[1] != 4 + nc {
        return Err(crate::Error::tensor(
            "detector output",
            format!(
                "shape {r:?}, expected [{}, {} (4 box rows + {nc} classes), anchors]",
                s[0],
                4 + nc
            ),
        ));
    }
    Ok((raw, lb))
}
