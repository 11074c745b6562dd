//! The plain denoising / flow-matching loss on the matched pairs: mean over images and
//! (C, H, W) of (target - prediction)^2. The reference adds it to the contrastive loss with
//! weight 10 for SD1.5/SDXL and 0 for SD3.
use serde::{Deserialize, Serialize};
use softalign_core::adapter::TokenSelection;
use softalign_core::objective::{Objective, Pairs, PredictionRequest, StepView, Term};
use softalign_core::plugin::ObjectiveSpec;
use softalign_core::{register_plugin, Error, Result};

use crate::util::{check_weight, diagonal, unit_weight};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DsmSpec {
    #[serde(default = "unit_weight")]
    pub weight: f64,
    /// Token set of the adapters (None: each adapter's first set).
    #[serde(default)]
    pub tokens: Option<String>,
}

register_plugin!(
    DSM_ENTRY,
    Objective,
    "dsm",
    "Denoising / flow-matching loss on the matched (image, caption) pairs",
    r#"[[objective]]
type = "dsm"
weight = 10.0
"#
);

#[typetag::serde(name = "dsm")]
impl ObjectiveSpec for DsmSpec {
    fn validate(&self) -> Result<()> {
        check_weight("dsm", self.weight)?;
        if self.tokens.as_deref() == Some("") {
            return Err(Error::Recipe(
                "objective dsm: `tokens` names no token set".into(),
            ));
        }
        Ok(())
    }
    fn token_sets(&self) -> Vec<(String, bool)> {
        self.tokens.iter().map(|s| (s.clone(), false)).collect()
    }
    fn build(&self) -> Result<Box<dyn Objective>> {
        self.validate()?;
        Ok(Box::new(Dsm {
            weight: self.weight,
            sel: TokenSelection::new(self.tokens.clone(), false),
        }))
    }
}

pub struct Dsm {
    weight: f64,
    sel: TokenSelection,
}

impl Objective for Dsm {
    fn name(&self) -> &str {
        "dsm"
    }
    fn weight(&self) -> f64 {
        self.weight
    }
    fn requests(&self) -> Vec<PredictionRequest> {
        vec![PredictionRequest {
            pairs: Pairs::Diagonal,
            tokens: self.sel.clone(),
            grad: true,
        }]
    }
    fn terms(&self, step: &dyn StepView) -> Result<Vec<Term>> {
        let preds = step.predictions(&self.sel, true)?;
        let loss = (step.target() - diagonal(&preds))
            .square()
            .mean(preds.kind());
        Ok(vec![Term {
            name: "dsm".into(),
            value: loss,
        }])
    }
}
