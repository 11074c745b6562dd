//! The counting term (SoftREPA paper, appendix D / Table 7: "an MSE between the object count
//! YOLOv8 predicts on denoised images and the count the caption asks for"). For each matched
//! pair whose timestep is below `max_timestep` (an x0 predicted at high noise is a blur) and
//! whose caption states counts (`caption_count`): the clean sample the prediction implies
//! (`NoiseProcess::predicted_x0`), decoded through the backbone with its graph, letterboxed
//! into the detector; NMS on the detached output picks the detections; the soft count of each
//! class (`detector::soft_counts`) regresses to the caption's count. The loss is the mean of
//! (soft - target)^2 over the (image, class) targets of the step; 0 when none qualifies.
use serde::{Deserialize, Serialize};
use softalign_core::adapter::TokenSelection;
use softalign_core::detector::{
    detect_raw, hard_counts, non_max_suppression, soft_counts, CountOptions, Detector, NmsOptions,
};
use softalign_core::objective::{Objective, Pairs, PredictionRequest, StepView, Term};
use softalign_core::plugin::{BuildContext, DetectorSpec, ObjectiveSpec};
use softalign_core::{register_plugin, Error, Result};
use tch::{Kind, Tensor};

use crate::caption_count::CaptionCounter;
use crate::util::{check_weight, unit_weight};

fn d_max_timestep() -> f64 {
    500.0
}
fn d_threshold() -> f64 {
    0.25
}
fn d_candidate() -> f64 {
    0.05
}
fn d_iou() -> f64 {
    0.7
}
fn d_temperature() -> f64 {
    0.05
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountingSpec {
    #[serde(default = "unit_weight")]
    pub weight: f64,
    pub detector: Box<dyn DetectorSpec>,
    /// Only pairs with a model timestep below this (0..1000 scale) are counted.
    #[serde(default = "d_max_timestep")]
    pub max_timestep: f64,
    /// The detection score that counts one half (ultralytics' `conf` for the hard count).
    #[serde(default = "d_threshold")]
    pub threshold: f64,
    /// NMS keeps candidates above this, so detections under `threshold` can be pushed over.
    #[serde(default = "d_candidate")]
    pub candidate_threshold: f64,
    /// NMS IoU (the predictor's 0.7).
    #[serde(default = "d_iou")]
    pub iou: f64,
    /// Of the sigmoid that turns a score into a count.
    #[serde(default = "d_temperature")]
    pub temperature: f64,
    /// Token set of the adapters (None: each adapter's first set).
    #[serde(default)]
    pub tokens: Option<String>,
}

register_plugin!(
    COUNTING_ENTRY,
    Objective,
    "counting",
    "MSE between a detector's soft object count on the predicted x0 and the caption's count",
    r#"[[objective]]
type = "counting"
weight = 0.1
detector = { type = "yolov8", file = "yolov8n.torchscript" }
max_timestep = 500.0
threshold = 0.25
temperature = 0.05
"#
);

impl CountingSpec {
    fn options(&self) -> (NmsOptions, CountOptions) {
        (
            NmsOptions {
                conf: self.candidate_threshold,
                iou: self.iou,
                ..NmsOptions::default()
            },
            CountOptions {
                threshold: self.threshold,
                temperature: self.temperature,
            },
        )
    }
}

#[typetag::serde(name = "counting")]
impl ObjectiveSpec for CountingSpec {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Recipe(format!("objective counting: {m}")));
        check_weight("counting", self.weight)?;
        if !(self.max_timestep.is_finite() && self.max_timestep > 0.0) {
            return bad(format!(
                "`max_timestep` must be positive on the 0..1000 scale (got {})",
                self.max_timestep
            ));
        }
        for (f, v) in [
            ("threshold", self.threshold),
            ("candidate_threshold", self.candidate_threshold),
            ("iou", self.iou),
        ] {
            if !(v.is_finite() && (0.0..1.0).contains(&v)) {
                return bad(format!("`{f}` must be in [0, 1) (got {v})"));
            }
        }
        if self.candidate_threshold > self.threshold {
            return bad(format!(
                "`candidate_threshold` ({}) above `threshold` ({}): detections between them \
                 could never be counted",
                self.candidate_threshold, self.threshold
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "`temperature` must be positive (got {})",
                self.temperature
            ));
        }
        if self.tokens.as_deref() == Some("") {
            return bad("`tokens` names no token set".into());
        }
        Ok(())
    }
    fn token_sets(&self) -> Vec<(String, bool)> {
        self.tokens.iter().map(|s| (s.clone(), false)).collect()
    }
    fn check_files(&self, ctx: &BuildContext) -> Result<()> {
        self.detector
            .check_files(ctx)
            .map_err(|e| Error::Recipe(format!("objective counting: detector: {e}")))
    }
    /// On the CPU, paths against the working directory (commands use `build_in`).
    fn build(&self) -> Result<Box<dyn Objective>> {
        self.build_in(&BuildContext::cpu("."))
    }
    fn build_in(&self, ctx: &BuildContext) -> Result<Box<dyn Objective>> {
        self.validate()?;
        let detector = self
            .detector
            .build(ctx)
            .map_err(|e| Error::Recipe(format!("objective counting: detector: {e}")))?;
        Ok(Box::new(Counting::new(self, detector)))
    }
}

/// The images of a step that the term counts, each with its (class, count) targets.
type Targets = Vec<(i64, Vec<(usize, u32)>)>;

pub struct Counting {
    weight: f64,
    max_timestep: f64,
    nms: NmsOptions,
    count: CountOptions,
    sel: TokenSelection,
    detector: Box<dyn Detector>,
    parser: CaptionCounter,
}

impl Counting {
    pub fn new(spec: &CountingSpec, detector: Box<dyn Detector>) -> Self {
        let (nms, count) = spec.options();
        Self {
            weight: spec.weight,
            max_timestep: spec.max_timestep,
            nms,
            count,
            sel: TokenSelection::new(spec.tokens.clone(), false),
            parser: CaptionCounter::new(detector.class_names()),
            detector,
        }
    }

    /// The images that qualify and their (class, count) targets.
    fn targets(&self, step: &dyn StepView) -> Result<Targets> {
        let captions = step.captions().ok_or_else(|| {
            Error::invalid(
                "objective counting reads the captions' text, which this data does not give \
                 (an encoding cache keeps only their encodings): train on the raw images and \
                 captions",
            )
        })?;
        let t = Vec::<f64>::try_from(
            step.timestep()
                .to_kind(Kind::Double)
                .to_device(tch::Device::Cpu),
        )?;
        Ok(captions
            .iter()
            .enumerate()
            .filter(|(i, _)| t[*i] < self.max_timestep)
            .map(|(i, c)| (i as i64, self.parser.parse(c)))
            .filter(|(_, targets)| !targets.is_empty())
            .collect())
    }
}

impl Objective for Counting {
    fn name(&self) -> &str {
        "counting"
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
        let kind = step.target().kind();
        let dev = step.target().device();
        let zero = || Tensor::zeros([], (kind, dev));
        let targets = self.targets(step)?;
        if targets.is_empty() {
            return Ok(vec![
                Term {
                    name: "counting".into(),
                    value: zero(),
                },
                Term {
                    name: "counting/images".into(),
                    value: zero(),
                },
                Term {
                    name: "counting/abs_error".into(),
                    value: zero(),
                },
            ]);
        }
        let images: Vec<i64> = targets.iter().map(|(i, _)| *i).collect();
        let x0 = step.predicted_x0(&self.sel, true, &images)?;
        let rgb = (step.decode(&x0)? + 1.0) / 2.0;
        let (raw, _) = detect_raw(self.detector.as_ref(), &rgb.to_kind(kind))?;
        let kept = non_max_suppression(&raw, &self.nms)?;
        let soft = soft_counts(&raw, &kept, &self.count)?;
        let hard = hard_counts(
            &kept,
            self.detector.class_names().len(),
            self.count.threshold,
        );
        let nc = soft.size()[1];
        let mut flat = Vec::new();
        let mut want = Vec::new();
        let mut abs = 0.0;
        for (row, (_, ts)) in targets.iter().enumerate() {
            for &(c, n) in ts {
                flat.push(row as i64 * nc + c as i64);
                want.push(f64::from(n));
                abs += (f64::from(hard[row][c]) - f64::from(n)).abs();
            }
        }
        let got = soft
            .reshape([-1])
            .index_select(0, &Tensor::from_slice(&flat).to_device(soft.device()));
        let want = Tensor::from_slice(&want)
            .to_kind(got.kind())
            .to_device(got.device());
        let loss = (got - want)
            .square()
            .mean(soft.kind())
            .to_device(dev)
            .to_kind(kind);
        let n = flat.len() as f64;
        Ok(vec![
            Term {
                name: "counting".into(),
                value: loss,
            },
            Term {
                name: "counting/images".into(),
                value: Tensor::from(images.len() as f64)
                    .to_kind(kind)
                    .to_device(dev),
            },
            Term {
                name: "counting/abs_error".into(),
                value: Tensor::from(abs / n).to_kind(kind).to_device(dev),
            },
        ])
    }
}
