//! SoftREPA's contrastive loss (paper Eqs. 9-14; reference code defaults): per pair
//! err = mean_{C,H,W} (target - prediction)^2, logit = scale * exp(-err / tau), cross-entropy
//! over the captions of each image (or the images of each caption, or both).
use serde::{Deserialize, Serialize};
use softalign_core::adapter::TokenSelection;
use softalign_core::objective::{Objective, Pairs, PredictionRequest, StepView, Term};
use softalign_core::plugin::ObjectiveSpec;
use softalign_core::{register_plugin, Error, Result};
use tch::{Kind, Tensor};

use crate::underflow::UnderflowWatch;
use crate::util::{pair_errors, unit_weight};

/// Which way the cross-entropy runs over the B x B logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// For each image, a softmax over the captions (the reference).
    #[default]
    ImageToText,
    /// For each caption, a softmax over the images.
    TextToImage,
    /// The mean of both (CLIP's symmetric form).
    Both,
}

fn d_scale() -> f64 {
    4.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContrastiveSpec {
    #[serde(default = "unit_weight")]
    pub weight: f64,
    /// Logit scale; the reference uses 4.0, the paper's Eq. 13 has none (1.0).
    #[serde(default = "d_scale")]
    pub scale: f64,
    /// Constant tau; the reference's 0.07 when neither this nor a schedule is given.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// The paper's tau(t): (model timestep, tau) points on the 0..1000 scale, interpolated
    /// linearly and held constant past the ends.
    #[serde(default)]
    pub temperature_schedule: Option<Vec<[f64; 2]>>,
    #[serde(default)]
    pub direction: Direction,
    /// Token set of the adapters (None: each adapter's first set).
    #[serde(default)]
    pub tokens: Option<String>,
}

register_plugin!(
    CONTRASTIVE_ENTRY,
    Objective,
    "softrepa_contrastive",
    "SoftREPA contrastive loss over the B x B (image, caption) pairs, logit scale*exp(-err/tau)",
    r#"[[objective]]
type = "softrepa_contrastive"
weight = 1.0
scale = 4.0
temperature = 0.07
direction = "image_to_text"
"#
);

const DEFAULT_TEMPERATURE: f64 = 0.07;

#[typetag::serde(name = "softrepa_contrastive")]
impl ObjectiveSpec for ContrastiveSpec {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| {
            Err(Error::Recipe(format!(
                "objective softrepa_contrastive: {m}"
            )))
        };
        if !self.weight.is_finite() {
            return bad(format!("`weight` must be finite (got {})", self.weight));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return bad(format!("`scale` must be positive (got {})", self.scale));
        }
        match (&self.temperature, &self.temperature_schedule) {
            (Some(_), Some(_)) => {
                return bad("give `temperature` or `temperature_schedule`, not both".into())
            }
            (Some(t), None) if !(t.is_finite() && *t > 0.0) => {
                return bad(format!("`temperature` must be positive (got {t})"))
            }
            (None, Some(s)) => {
                if s.is_empty() {
                    return bad("`temperature_schedule` needs at least one point".into());
                }
                for (k, [t, tau]) in s.iter().enumerate() {
                    if !(tau.is_finite() && *tau > 0.0 && t.is_finite()) {
                        return bad(format!(
                            "`temperature_schedule[{k}]` = [{t}, {tau}]: tau must be positive"
                        ));
                    }
                    if k > 0 && s[k - 1][0] >= *t {
                        return bad("`temperature_schedule` timesteps must increase".into());
                    }
                }
            }
            _ => {}
        }
        if self.tokens.as_deref() == Some("") {
            return bad("`tokens` names no token set".into());
        }
        Ok(())
    }

    fn token_sets(&self) -> Vec<(String, bool)> {
        self.tokens.iter().map(|s| (s.clone(), false)).collect()
    }

    /// One image has only its own caption: the softmax over one logit is 1, the loss 0.
    fn min_images_per_step(&self) -> i64 {
        2
    }
    fn min_images_reason(&self) -> &'static str {
        "it compares each image with the others' captions; with one its loss is constant and \
         nothing is learned"
    }

    fn build(&self) -> Result<Box<dyn Objective>> {
        self.validate()?;
        Ok(Box::new(Contrastive {
            spec: self.clone(),
            sel: TokenSelection::new(self.tokens.clone(), false),
            underflow: UnderflowWatch::default(),
        }))
    }
}

pub struct Contrastive {
    spec: ContrastiveSpec,
    sel: TokenSelection,
    underflow: UnderflowWatch,
}

impl Contrastive {
    /// tau per image (B,) from the model timestep.
    fn tau(&self, t: &Tensor) -> Tensor {
        match &self.spec.temperature_schedule {
            None => t.ones_like() * self.spec.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            Some(points) => {
                let v: Vec<f64> = t
                    .to_kind(Kind::Double)
                    .to_device(tch::Device::Cpu)
                    .try_into()
                    .unwrap_or_default();
                let taus: Vec<f64> = v.iter().map(|&x| interpolate(points, x)).collect();
                Tensor::from_slice(&taus)
                    .to_kind(t.kind())
                    .to_device(t.device())
            }
        }
    }
}

/// Piecewise-linear through `points`, constant outside.
fn interpolate(points: &[[f64; 2]], x: f64) -> f64 {
    let first = points[0];
    let last = points[points.len() - 1];
    if x <= first[0] {
        return first[1];
    }
    if x >= last[0] {
        return last[1];
    }
    for w in points.windows(2) {
        let ([x0, y0], [x1, y1]) = (w[0], w[1]);
        if x <= x1 {
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0);
        }
    }
    last[1]
}

impl Objective for Contrastive {
    fn name(&self) -> &str {
        "softrepa_contrastive"
    }
    fn weight(&self) -> f64 {
        self.spec.weight
    }
    fn requests(&self) -> Vec<PredictionRequest> {
        vec![PredictionRequest {
            pairs: Pairs::All,
            tokens: self.sel.clone(),
            grad: true,
        }]
    }
    fn terms(&self, step: &dyn StepView) -> Result<Vec<Term>> {
        let b = step.images();
        let preds = step.predictions(&self.sel, true)?;
        let err = pair_errors(&preds, step.target());
        let tau = self.tau(step.timestep()).unsqueeze(1);
        let ratio = (&err / &tau).detach();
        let warning = self.underflow.observe(
            ratio.min().double_value(&[]),
            err.detach().mean(Kind::Float).double_value(&[]),
            tau.mean(Kind::Float).double_value(&[]),
            b,
        );
        if let Some(w) = warning {
            eprintln!("{w}");
        }
        let logits = (-(&err / tau)).exp() * self.spec.scale;
        let labels = Tensor::arange(b, (Kind::Int64, err.device()));
        // In the logits' own precision (tch's cross_entropy_for_logits casts to fp32).
        let ce = |l: &Tensor| {
            -l.log_softmax(1, l.kind())
                .gather(1, &labels.unsqueeze(1), false)
                .mean(l.kind())
        };
        let loss = match self.spec.direction {
            Direction::ImageToText => ce(&logits),
            Direction::TextToImage => ce(&logits.tr()),
            Direction::Both => (ce(&logits) + ce(&logits.tr())) * 0.5,
        };
        let k = err.kind();
        let eye = Tensor::eye(b, (k, err.device()));
        let pos = (&err * &eye).sum(k) / b as f64;
        let neg = if b > 1 {
            (&err * eye.ones_like().g_sub(&eye)).sum(k) / (b * (b - 1)) as f64
        } else {
            Tensor::zeros([], (k, err.device()))
        };
        let acc = logits
            .detach()
            .argmax(1, false)
            .eq_tensor(&labels)
            .to_kind(k)
            .mean(k);
        Ok(vec![
            Term {
                name: self.name().into(),
                value: loss,
            },
            Term {
                name: "softrepa_contrastive/pos_err".into(),
                value: pos.detach(),
            },
            Term {
                name: "softrepa_contrastive/neg_err".into(),
                value: neg.detach(),
            },
            Term {
                name: "softrepa_contrastive/accuracy".into(),
                value: acc,
            },
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::interpolate;

    #[test]
    fn schedule_interpolates_and_clamps() {
        let p = [[0.0, 0.1], [1000.0, 0.5]];
        assert_eq!(interpolate(&p, -5.0), 0.1);
        assert!((interpolate(&p, 500.0) - 0.3).abs() < 1e-12);
        assert_eq!(interpolate(&p, 2000.0), 0.5);
    }
}
