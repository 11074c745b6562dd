//! Small pieces the objectives share.
use tch::{Kind, Tensor};

pub(crate) fn unit_weight() -> f64 {
    1.0
}

/// err_ij = mean_{C,H,W} (target_i - pred_ij)^2 for predictions (B, B, C, H, W) and targets
/// (B, C, H, W): (B, B).
pub(crate) fn pair_errors(preds: &Tensor, target: &Tensor) -> Tensor {
    (target.unsqueeze(1) - preds)
        .square()
        .mean_dim(&[2i64, 3, 4][..], false, preds.kind())
}

/// The matched pairs (i, i) of (B, B, ...): (B, ...).
pub(crate) fn diagonal(preds: &Tensor) -> Tensor {
    let b = preds.size()[0];
    let idx = Tensor::arange(b, (Kind::Int64, preds.device())) * (b + 1);
    preds.flatten(0, 1).index_select(0, &idx)
}

/// (B, B) float mask of the mismatched pairs.
pub(crate) fn off_diagonal_mask(b: i64, kind: Kind, device: tch::Device) -> Tensor {
    1.0 - Tensor::eye(b, (kind, device))
}

pub(crate) fn check_weight(objective: &str, w: f64) -> softalign_core::Result<()> {
    if w.is_finite() {
        Ok(())
    } else {
        Err(softalign_core::Error::Recipe(format!(
            "objective {objective}: `weight` must be finite (got {w})"
        )))
    }
}
