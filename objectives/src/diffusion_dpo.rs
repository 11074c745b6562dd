//! Diffusion-DPO (Wallace et al. 2023; DiffusionDPO train.py) on preference pairs: how much
//! more the adapted model lowers the denoising error of the preferred image than of the
//! rejected one, relative to the frozen model. The reference model is the same backbone with
//! every adapter switched off, so no second copy of the weights is held.
//!
//! Per image, err = mean over (C, H, W) of (pred - target)^2; model_diff = err_w - err_l with
//! the adapters, ref_diff likewise without them (no gradient); inside = -beta/2 (model_diff -
//! ref_diff); loss = mean(-log sigmoid(inside)); implicit accuracy = mean(inside > 0), i.e.
//! the fraction of pairs the adapted model already ranks better than the reference. With
//! `sft = true` the loss is the plain denoising loss on the preferred images (train.py --sft).
use serde::{Deserialize, Serialize};
use softalign_core::adapter::TokenSelection;
use softalign_core::objective::{Objective, Pairs, PredictionRequest, StepView, Term};
use softalign_core::plugin::ObjectiveSpec;
use softalign_core::{register_plugin, Error, Result};
use tch::{Kind, Tensor};

use crate::util::{check_weight, diagonal, unit_weight};

fn default_beta() -> f64 {
    5000.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionDpoSpec {
    #[serde(default = "unit_weight")]
    pub weight: f64,
    /// KL strength beta (train.py `--beta_dpo`; 5000 in the released SD1.5 and SDXL runs).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Supervised fine-tuning on the preferred images instead (train.py `--sft`).
    #[serde(default)]
    pub sft: bool,
    /// Token set of the adapters (None: each adapter's first set).
    #[serde(default)]
    pub tokens: Option<String>,
}

register_plugin!(
    DIFFUSION_DPO_ENTRY,
    Objective,
    "diffusion_dpo",
    "Diffusion-DPO on preference pairs; the reference is the backbone with adapters off",
    r#"[[objective]]
type = "diffusion_dpo"
beta = 5000.0        # train.py --beta_dpo
sft = false          # true: plain denoising loss on the preferred images
"#
);

#[typetag::serde(name = "diffusion_dpo")]
impl ObjectiveSpec for DiffusionDpoSpec {
    fn validate(&self) -> Result<()> {
        check_weight("diffusion_dpo", self.weight)?;
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(Error::Recipe(format!(
                "objective diffusion_dpo: `beta` must be positive and finite (got {})",
                self.beta
            )));
        }
        if self.tokens.as_deref() == Some("") {
            return Err(Error::Recipe(
                "objective diffusion_dpo: `tokens` names no token set".into(),
            ));
        }
        Ok(())
    }
    fn token_sets(&self) -> Vec<(String, bool)> {
        self.tokens.iter().map(|s| (s.clone(), false)).collect()
    }
    /// One preferred and one rejected image.
    fn min_images_per_step(&self) -> i64 {
        2
    }
    fn min_images_reason(&self) -> &'static str {
        "a batch holds preferred and rejected images of each pair, so at least one pair"
    }
    fn build(&self) -> Result<Box<dyn Objective>> {
        self.validate()?;
        Ok(Box::new(DiffusionDpo {
            weight: self.weight,
            beta: self.beta,
            sft: self.sft,
            sel: TokenSelection::new(self.tokens.clone(), false),
        }))
    }
}

pub struct DiffusionDpo {
    weight: f64,
    beta: f64,
    sft: bool,
    sel: TokenSelection,
}

/// Per-image squared error, mean over (C, H, W): (B,).
fn per_image_error(pred: &Tensor, target: &Tensor) -> Tensor {
    (pred - target)
        .square()
        .mean_dim(&[1i64, 2, 3][..], false, pred.kind())
}

/// err_w - err_l for errors (2N,) laid out [preferred; rejected]: (N,).
fn preferred_minus_rejected(err: &Tensor) -> Tensor {
    let n = err.size()[0] / 2;
    err.narrow(0, 0, n) - err.narrow(0, n, n)
}

/// DiffusionDPO's loss and implicit accuracy from the model's and the reference's
/// per-pair error differences (N,).
pub fn dpo_loss(model_diff: &Tensor, ref_diff: &Tensor, beta: f64) -> (Tensor, Tensor) {
    let inside = (model_diff - ref_diff) * (-0.5 * beta);
    let loss = -inside.log_sigmoid().mean(inside.kind());
    let implicit_acc = inside.gt(0.0).to_kind(inside.kind()).mean(inside.kind());
    (loss, implicit_acc)
}

impl Objective for DiffusionDpo {
    fn name(&self) -> &str {
        "diffusion_dpo"
    }
    fn weight(&self) -> f64 {
        self.weight
    }
    fn requests(&self) -> Vec<PredictionRequest> {
        let mut r = vec![PredictionRequest {
            pairs: Pairs::Diagonal,
            tokens: self.sel.clone(),
            grad: true,
        }];
        if !self.sft {
            r.push(PredictionRequest {
                pairs: Pairs::Diagonal,
                tokens: TokenSelection::adapters_off(),
                grad: false,
            });
        }
        r
    }
    fn terms(&self, step: &dyn StepView) -> Result<Vec<Term>> {
        if !step.preference_pairs() {
            return Err(Error::invalid(
                "objective diffusion_dpo needs preference pairs: use a `preference_pairs` \
                 dataset (a preferred and a rejected image per prompt)",
            ));
        }
        let n = step.images() / 2;
        let target = step.target();
        let pred = diagonal(&step.predictions(&self.sel, true)?);
        let err = per_image_error(&pred, target);
        if self.sft {
            // F.mse_loss(pred_w, eps_w, "mean"): the mean over the preferred half.
            let loss = err.narrow(0, 0, n).mean(err.kind());
            return Ok(vec![Term {
                name: "diffusion_dpo".into(),
                value: loss,
            }]);
        }
        let ref_pred = diagonal(&step.predictions(&TokenSelection::adapters_off(), false)?);
        let ref_err = per_image_error(&ref_pred, target).detach();
        let (loss, acc) = dpo_loss(
            &preferred_minus_rejected(&err),
            &preferred_minus_rejected(&ref_err),
            self.beta,
        );
        let kind = Kind::Float;
        Ok(vec![
            Term {
                name: "diffusion_dpo".into(),
                value: loss,
            },
            Term {
                name: "diffusion_dpo_implicit_acc".into(),
                value: acc.to_kind(kind),
            },
            // train.py logs these two as raw_model_loss and raw_ref_loss.
            Term {
                name: "diffusion_dpo_model_mse".into(),
                value: err.detach().mean(kind),
            },
            Term {
                name: "diffusion_dpo_ref_mse".into(),
                value: ref_err.mean(kind),
            },
        ])
    }
}
