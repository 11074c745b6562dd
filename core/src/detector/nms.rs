//! Non-maximum suppression as ultralytics' `non_max_suppression` does it for YOLOv8 outputs
//! (utils/nms.py, multi_label = False, agnostic = False): per anchor the best class and its
//! score; anchors scoring above `conf` sorted by score, at most `max_nms` of them; greedy NMS
//! per class (torchvision.ops.nms on class-offset boxes) at IoU `iou`; at most `max_det` kept.
//! It runs on detached values: which detections exist is a discrete choice, and gradients flow
//! through the kept detections' scores instead (see `count`).
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NmsOptions {
    /// Score threshold of a candidate (ultralytics `conf`).
    pub conf: f64,
    /// IoU above which a lower-scoring box of the same class is suppressed.
    pub iou: f64,
    pub max_det: usize,
    pub max_nms: usize,
}

impl Default for NmsOptions {
    /// The predictor's defaults (cfg/default.yaml: conf 0.25, iou 0.7, max_det 300).
    fn default() -> Self {
        Self {
            conf: 0.25,
            iou: 0.7,
            max_det: 300,
            max_nms: 30000,
        }
    }
}

/// One detection that survived NMS.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kept {
    /// Column of the raw output.
    pub anchor: i64,
    pub class: usize,
    pub score: f32,
    /// x1, y1, x2, y2 in detector input pixels.
    pub xyxy: [f32; 4],
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: &[f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    inter / (area(a) + area(b) - inter)
}

/// NMS on each image of a raw output [B, 4 + nc, A]; the kept detections by descending score.
pub fn non_max_suppression(raw: &Tensor, opts: &NmsOptions) -> Result<Vec<Vec<Kept>>> {
    let s = raw.size();
    if s.len() != 3 || s[1] < 5 {
        return Err(Error::tensor(
            "detector output",
            format!("shape {s:?}, expected [B, 4 + classes, anchors]"),
        ));
    }
    let (b, rows, a) = (s[0], s[1], s[2]);
    let nc = (rows - 4) as usize;
    let host = raw
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let flat = Vec::<f32>::try_from(host.view([-1]))?;
    let at = |img: i64, row: i64, anchor: i64| flat[((img * rows + row) * a + anchor) as usize];
    let mut out = Vec::with_capacity(b as usize);
    for img in 0..b {
        let mut cands: Vec<Kept> = Vec::new();
        for anchor in 0..a {
            let (mut class, mut score) = (0usize, f32::NEG_INFINITY);
            for c in 0..nc {
                let v = at(img, 4 + c as i64, anchor);
                if v > score {
                    (class, score) = (c, v);
                }
            }
            if f64::from(score) <= opts.conf {
                continue;
            }
            let (cx, cy, w, h) = (
                at(img, 0, anchor),
                at(img, 1, anchor),
                at(img, 2, anchor),
                at(img, 3, anchor),
            );
            cands.push(Kept {
                anchor,
                class,
                score,
                xyxy: [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0],
            });
        }
        cands.sort_by(|p, q| q.score.total_cmp(&p.score));
        cands.truncate(opts.max_nms);
        let mut kept: Vec<Kept> = Vec::new();
        for c in cands {
            let suppressed = kept
                .iter()
                .any(|k| k.class == c.class && f64::from(iou(&k.xyxy, &c.xyxy)) > opts.iou);
            if !suppressed {
                kept.push(c);
                if kept.len() == opts.max_det {
                    break;
                }
            }
        }
        out.push(kept);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_boxes_of_one_class_collapse_others_stay() {
        // 4 anchors, 2 classes: anchors 0 and 1 overlap (class 0), anchor 2 overlaps them but
        // is class 1, anchor 3 scores below conf.
        let raw = Tensor::from_slice(&[
            10.0f32, 11.0, 10.0, 40.0, // cx
            10.0, 10.0, 10.0, 40.0, // cy
            8.0, 8.0, 8.0, 8.0, // w
            8.0, 8.0, 8.0, 8.0, // h
            0.9, 0.8, 0.1, 0.1, // class 0
            0.1, 0.1, 0.7, 0.2, // class 1
        ])
        .view([1, 6, 4]);
        let kept = non_max_suppression(&raw, &NmsOptions::default()).unwrap();
        let got: Vec<(i64, usize)> = kept[0].iter().map(|k| (k.anchor, k.class)).collect();
        assert_eq!(got, vec![(0, 0), (2, 1)]);
        assert!(non_max_suppression(&raw.view([6, 4]), &NmsOptions::default()).is_err());
    }
}
