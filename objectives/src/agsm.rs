//! AGSM (alignment-guided score matching), as the released code computes it: EMA predictions
//! at (x_t, t) give Plackett-Luce weights w_ik = softmax_k(r_ik / tau), r = -(EMA error), and a
//! guidance g_ij = ema_ij - sum_k w_ik ema_ik. Matched pairs regress with the positive tokens
//! to target + gamma_plus * g, mismatched pairs with the negative tokens to
//! target - gamma_minus * g. The whole tilted target is a constant.
use serde::{Deserialize, Serialize};
use softalign_core::adapter::TokenSelection;
use softalign_core::objective::{Objective, Pairs, PredictionRequest, StepView, Term};
use softalign_core::plugin::ObjectiveSpec;
use softalign_core::{register_plugin, Error, Result};
use tch::Tensor;

use crate::util::{check_weight, diagonal, off_diagonal_mask, pair_errors, unit_weight};

fn d_gamma_plus() -> f64 {
    1.0
}
fn d_gamma_minus() -> f64 {
    0.1
}
fn d_tau() -> f64 {
    0.1
}
fn d_positive() -> String {
    "positive".into()
}
fn d_negative() -> String {
    "negative".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgsmSpec {
    #[serde(default = "unit_weight")]
    pub weight: f64,
    #[serde(default = "d_gamma_plus")]
    pub gamma_plus: f64,
    /// 0.1 for SD3 in the paper, 1 for SD1.5/SDXL; 0 drops the negative term.
    #[serde(default = "d_gamma_minus")]
    pub gamma_minus: f64,
    /// Plackett-Luce temperature on r = -(EMA error).
    #[serde(default = "d_tau")]
    pub tau: f64,
    /// Token set of the matched pairs (psi+); also the one sampling uses.
    #[serde(default = "d_positive")]
    pub positive: String,
    /// Token set of the mismatched pairs (psi-).
    #[serde(default = "d_negative")]
    pub negative: String,
}

register_plugin!(
    AGSM_ENTRY,
    Objective,
    "agsm",
    "Alignment-guided score matching: tilted targets from EMA tokens, psi+ / psi- token sets",
    r#"[[objective]]
type = "agsm"
gamma_plus = 1.0
gamma_minus = 0.1
tau = 0.1
positive = "positive"
negative = "negative"
"#
);

#[typetag::serde(name = "agsm")]
impl ObjectiveSpec for AgsmSpec {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Recipe(format!("objective agsm: {m}")));
        check_weight("agsm", self.weight)?;
        for (f, v) in [
            ("gamma_plus", self.gamma_plus),
            ("gamma_minus", self.gamma_minus),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("`{f}` must be a non-negative number (got {v})"));
            }
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return bad(format!("`tau` must be positive (got {})", self.tau));
        }
        for (f, v) in [("positive", &self.positive), ("negative", &self.negative)] {
            if v.is_empty() {
                return bad(format!("`{f}` names no token set"));
            }
        }
        Ok(())
    }
    /// Both sets are read through their EMA copies.
    fn token_sets(&self) -> Vec<(String, bool)> {
        let mut v = vec![(self.positive.clone(), true)];
        if self.negative != self.positive {
            v.push((self.negative.clone(), true));
        }
        v
    }
    fn build(&self) -> Result<Box<dyn Objective>> {
        self.validate()?;
        Ok(Box::new(Agsm { spec: self.clone() }))
    }
}

pub struct Agsm {
    spec: AgsmSpec,
}

impl Agsm {
    fn has_negative_term(&self) -> bool {
        self.spec.gamma_minus != 0.0
    }
}

impl Objective for Agsm {
    fn name(&self) -> &str {
        "agsm"
    }
    fn weight(&self) -> f64 {
        self.spec.weight
    }
    fn requests(&self) -> Vec<PredictionRequest> {
        let s = &self.spec;
        let req = |pairs, tokens, grad| PredictionRequest {
            pairs,
            tokens,
            grad,
        };
        // The weights w run over every caption, so the EMA predictions are needed on all
        // pairs even when the negative term is dropped.
        let mut v = vec![
            req(Pairs::Diagonal, TokenSelection::online(&s.positive), true),
            req(Pairs::Diagonal, TokenSelection::ema(&s.positive), false),
            req(Pairs::OffDiagonal, TokenSelection::ema(&s.negative), false),
        ];
        if self.has_negative_term() {
            v.push(req(
                Pairs::OffDiagonal,
                TokenSelection::online(&s.negative),
                true,
            ));
        }
        v
    }
    fn terms(&self, step: &dyn StepView) -> Result<Vec<Term>> {
        let s = &self.spec;
        let b = step.images();
        let dev = step.target().device();
        let k = step.target().kind();
        let off = off_diagonal_mask(b, k, dev);
        let mask5 = |m: &Tensor| m.view([b, b, 1, 1, 1]);
        let target = step.target();
        let (g, pl_entropy) = {
            let _guard = tch::no_grad_guard();
            // psi+ EMA on the matched pairs, psi- EMA on the others.
            let ema_pos = step.predictions(&TokenSelection::ema(&s.positive), false)?;
            let ema_neg = step.predictions(&TokenSelection::ema(&s.negative), false)?;
            let ema = &ema_pos * mask5(&(1.0 - &off)) + &ema_neg * mask5(&off);
            let r = -pair_errors(&ema, target);
            let w = (r / s.tau).softmax(1, k);
            let mean = Tensor::einsum("ik,ikchw->ichw", &[&w, &ema], None::<i64>);
            let g = &ema - mean.unsqueeze(1);
            let ent = -(&w * (&w + 1e-30).log()).sum_dim_intlist(1, false, k);
            (g, ent.mean(k))
        };
        let pos_pred = diagonal(&step.predictions(&TokenSelection::online(&s.positive), true)?);
        let pos_target = target + diagonal(&g) * s.gamma_plus;
        let pos = (pos_pred - pos_target).square().mean(k);
        let neg = if self.has_negative_term() && b > 1 {
            let neg_pred = step.predictions(&TokenSelection::online(&s.negative), true)?;
            let neg_target = target.unsqueeze(1) - &g * s.gamma_minus;
            ((neg_pred - neg_target)
                .square()
                .mean_dim(&[2i64, 3, 4][..], false, k)
                * &off)
                .sum(k)
                / (b * (b - 1)) as f64
        } else {
            Tensor::zeros([], (k, dev))
        };
        let loss = &pos + &neg;
        Ok(vec![
            Term {
                name: "agsm".into(),
                value: loss,
            },
            Term {
                name: "agsm/positive".into(),
                value: pos.detach(),
            },
            Term {
                name: "agsm/negative".into(),
                value: neg.detach(),
            },
            Term {
                name: "agsm/weight_entropy".into(),
                value: pl_entropy,
            },
        ])
    }
}
