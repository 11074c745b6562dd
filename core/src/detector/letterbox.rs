//! Ultralytics' letterbox (data/augment.py LetterBox, center = True, auto = False): scale the
//! image by r = min(H / h, W / w) keeping its aspect, resize to (round(h r), round(w r)) and
//! pad to (H, W) with 114/255, the padding split as top = round(dh - 0.1), left =
//! round(dw - 0.1). The resize is torch's bilinear interpolation (align_corners = False, no
//! antialias), which is differentiable; ultralytics uses cv2.INTER_LINEAR, which equals it when
//! upscaling and differs slightly when downscaling.
use tch::Tensor;

use crate::{Error, Result};

/// The pad value of ultralytics' predictor, in [0, 1].
pub const PAD: f64 = 114.0 / 255.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Letterbox {
    /// (h, w) of the images.
    pub from: (i64, i64),
    /// (H, W) of the detector's input.
    pub to: (i64, i64),
    /// (h', w') after resizing, before padding.
    pub resized: (i64, i64),
    pub scale: f64,
    pub top: i64,
    pub left: i64,
}

/// Python's round (half to even), as ultralytics' `round(...)` computes it.
fn py_round(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        (r - x.signum()) as i64
    } else {
        r as i64
    }
}

impl Letterbox {
    pub fn new(from: (i64, i64), to: (i64, i64)) -> Result<Self> {
        if from.0 <= 0 || from.1 <= 0 || to.0 <= 0 || to.1 <= 0 {
            return Err(Error::invalid(format!(
                "letterbox from {from:?} to {to:?}: sizes must be positive"
            )));
        }
        let scale = (to.0 as f64 / from.0 as f64).min(to.1 as f64 / from.1 as f64);
        let resized = (
            py_round(from.0 as f64 * scale).clamp(1, to.0),
            py_round(from.1 as f64 * scale).clamp(1, to.1),
        );
        let dh = (to.0 - resized.0) as f64 / 2.0;
        let dw = (to.1 - resized.1) as f64 / 2.0;
        Ok(Self {
            from,
            to,
            resized,
            scale,
            top: py_round(dh - 0.1),
            left: py_round(dw - 0.1),
        })
    }

    /// (B, 3, h, w) in [0, 1] to (B, 3, H, W), differentiably.
    pub fn apply(&self, images: &Tensor) -> Tensor {
        let x = if self.resized == self.from {
            images.shallow_clone()
        } else {
            images.upsample_bilinear2d([self.resized.0, self.resized.1], false, None, None)
        };
        if self.resized == self.to {
            return x;
        }
        let bottom = self.to.0 - self.resized.0 - self.top;
        let right = self.to.1 - self.resized.1 - self.left;
        // Zero padding of (x - PAD), shifted back: PAD outside, x inside.
        (x - PAD).constant_pad_nd([self.left, right, self.top, bottom]) + PAD
    }

    /// A box (x1, y1, x2, y2) in detector input pixels to the image's pixels, clipped to it
    /// (ultralytics' scale_boxes).
    pub fn to_image(&self, b: [f64; 4]) -> [f64; 4] {
        let (h, w) = (self.from.0 as f64, self.from.1 as f64);
        let x = |v: f64| ((v - self.left as f64) / self.scale).clamp(0.0, w);
        let y = |v: f64| ((v - self.top as f64) / self.scale).clamp(0.0, h);
        [x(b[0]), y(b[1]), x(b[2]), y(b[3])]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letterbox_matches_ultralytics_arithmetic() {
        // 480x640 into 640x640: scale 1, 80 rows of padding each side.
        let lb = Letterbox::new((480, 640), (640, 640)).unwrap();
        assert_eq!((lb.resized, lb.top, lb.left), ((480, 640), 80, 0));
        // 33x50 into 64x64: scale 1.28, 42x64, dh = 11 -> top round(10.9) = 11.
        let lb = Letterbox::new((33, 50), (64, 64)).unwrap();
        assert_eq!((lb.resized, lb.top, lb.left), ((42, 64), 11, 0));
        let img = Tensor::ones([1, 3, 33, 50], (tch::Kind::Float, tch::Device::Cpu));
        let out = lb.apply(&img);
        assert_eq!(out.size(), [1, 3, 64, 64]);
        let corner = out.double_value(&[0, 0, 0, 0]);
        assert!((corner - PAD).abs() < 1e-6, "pad value {corner}");
        assert!((out.double_value(&[0, 0, 32, 32]) - 1.0).abs() < 1e-6);
        let b = lb.to_image([0.0, 11.0, 64.0, 53.0]);
        assert!((b[1]).abs() < 1e-9 && (b[2] - 50.0).abs() < 1e-9);
        assert!(Letterbox::new((0, 5), (64, 64)).is_err());
    }
}
