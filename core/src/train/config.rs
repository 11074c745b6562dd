//! The `[train]` table of a recipe.
use serde::{Deserialize, Serialize};

use crate::dtype::{DType, DeviceSpec};
use crate::{Error, Result};

fn d_images() -> i64 {
    4
}
fn d_one_u32() -> u32 {
    1
}
fn d_one_u64() -> u64 {
    1
}
fn d_max_bad() -> u32 {
    5
}
fn d_keep() -> usize {
    3
}
/// `train.checkpoint.every` when a recipe leaves it out: the reference's 500 steps, so a
/// stopped or crashed long run loses at most that many.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 500;
fn d_every() -> u64 {
    DEFAULT_CHECKPOINT_EVERY
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: u64,
    /// B: images (and captions) per micro-batch; B x B pairs per forward set.
    #[serde(default = "d_images")]
    pub images_per_step: i64,
    /// Micro-batches whose gradients are summed (averaged) into one optimizer step.
    #[serde(default = "d_one_u32")]
    pub grad_accum: u32,
    /// Pairs per backbone forward; the B x B cross is split into chunks of this many pairs and
    /// the gradients are accumulated so the step equals the unchunked one. Default: all.
    #[serde(default)]
    pub pairs_per_forward: Option<i64>,
    /// Data-parallel runs: `rank` (default, as the reference) contrasts each image with the
    /// captions of its own rank's micro-batch; `global` with those of every rank, as one
    /// process with world size x images_per_step images would (the pairs are split over ranks).
    #[serde(default, skip_serializing_if = "BatchScope::is_rank")]
    pub contrastive_scope: BatchScope,
    /// Draw one noise per image instead of one shared by the whole step (the reference shares).
    #[serde(default)]
    pub per_image_noise: bool,
    /// Draw one timestep per image instead of one shared by the whole step (the reference
    /// shares; pretraining a model from scratch learns faster with one per image).
    #[serde(default)]
    pub per_image_timesteps: bool,
    /// `adapter`: train the adapters on a frozen backbone; `full`: train the backbone itself.
    #[serde(default)]
    pub mode: TrainMode,
    /// In full mode, backbone weights left out of training: globs over their names (`*` any
    /// run of characters), e.g. `["text_encoder.*"]` to train a denoiser on a fixed text
    /// tower. Each glob must match some weight.
    #[serde(default)]
    pub frozen: Vec<String>,
    pub lr: f64,
    #[serde(default)]
    pub optimizer: AdamWConfig,
    /// Per-parameter-group overrides, matched against names like `default.tokens`,
    /// `time_table` or backbone weight names; first match wins.
    #[serde(default)]
    pub param_groups: Vec<ParamGroupConfig>,
    #[serde(default)]
    pub schedule: Schedule,
    /// Linear warm-up from 0 over this many steps, before the schedule.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Clip the global gradient norm to this value.
    #[serde(default)]
    pub grad_clip: Option<f64>,
    /// Storage precision of the frozen weights. Trainable parameters and optimizer state are
    /// always fp32.
    #[serde(default)]
    pub weights_dtype: DType,
    #[serde(default)]
    pub device: DeviceSpec,
    /// EMA of the trainable parameters (separate from an adapter's own token EMA).
    #[serde(default)]
    pub ema: Option<EmaConfig>,
    /// Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped).
    #[serde(default = "d_max_bad")]
    pub max_bad_steps: u32,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Log (metrics.jsonl, W&B) every this many steps.
    #[serde(default = "d_one_u64")]
    pub log_every: u64,
}

/// Which images a data-parallel micro-batch's pairs cross: its rank's, or every rank's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BatchScope {
    #[default]
    Rank,
    Global,
}

impl BatchScope {
    pub fn is_rank(&self) -> bool {
        *self == BatchScope::Rank
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TrainMode {
    #[default]
    Adapter,
    Full,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The reference's AdamW: betas (0.9, 0.999), eps 1e-8, weight decay 1e-4.
    fn default() -> Self {
        Self {
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 1e-4,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamGroupConfig {
    /// A glob over parameter names (`*` matches any run of characters).
    pub params: String,
    pub lr: Option<f64>,
    pub weight_decay: Option<f64>,
    pub betas: Option<[f64; 2]>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    #[default]
    Constant,
    /// Cosine decay from lr to `eta_min` over the run (after warm-up).
    Cosine {
        #[serde(default)]
        eta_min: f64,
    },
    /// torch's CosineAnnealingWarmRestarts(T_0, T_mult, eta_min), stepped once every `every`
    /// optimizer steps: 1 steps it per step; the reference steps it every 500 steps with T_0 = 10.
    WarmRestarts {
        t_0: u64,
        #[serde(default = "d_one_u64")]
        t_mult: u64,
        #[serde(default)]
        eta_min: f64,
        #[serde(default = "d_one_u64")]
        every: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    pub decay: f64,
    /// diffusers `EMAModel`'s ramp: the decay at optimizer step k is
    /// min(decay, k / (9 + k)) (0 at the first step, so the average starts at the trained
    /// weights, not the initial ones). Without it a from-scratch model's EMA keeps
    /// decay^steps of its random init (a quarter after 1400 steps at 0.999).
    #[serde(default)]
    pub warmup: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Write a checkpoint every this many steps (0: only at the end and when stopped by a
    /// signal). Default 500.
    #[serde(default = "d_every")]
    pub every: u64,
    /// Keep the newest this many checkpoint folders (plus `latest`).
    #[serde(default = "d_keep")]
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every: d_every(),
            keep: d_keep(),
        }
    }
}

fn positive(field: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::Recipe(format!(
            "train.{field} must be a positive number (got {v})"
        )))
    }
}

fn non_negative(field: &str, v: f64) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(Error::Recipe(format!(
            "train.{field} must be a non-negative number (got {v})"
        )))
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Recipe(m));
        if self.steps == 0 {
            return bad("train.steps must be at least 1".into());
        }
        if self.images_per_step < 1 {
            return bad(format!(
                "train.images_per_step must be at least 1 (got {})",
                self.images_per_step
            ));
        }
        if self.grad_accum == 0 {
            return bad("train.grad_accum must be at least 1".into());
        }
        if let Some(p) = self.pairs_per_forward {
            if p < 1 {
                return bad(format!(
                    "train.pairs_per_forward must be at least 1 (got {p})"
                ));
            }
        }
        positive("lr", self.lr)?;
        let o = &self.optimizer;
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return bad(format!(
                    "train.optimizer.betas[{i}] must be in [0, 1) (got {b})"
                ));
            }
        }
        positive("optimizer.eps", o.eps)?;
        non_negative("optimizer.weight_decay", o.weight_decay)?;
        for (i, g) in self.param_groups.iter().enumerate() {
            if g.params.is_empty() {
                return bad(format!("train.param_groups[{i}].params is empty"));
            }
            if let Some(lr) = g.lr {
                positive(&format!("param_groups[{i}].lr"), lr)?;
            }
            if let Some(wd) = g.weight_decay {
                non_negative(&format!("param_groups[{i}].weight_decay"), wd)?;
            }
        }
        match &self.schedule {
            Schedule::Constant => {}
            Schedule::Cosine { eta_min } => non_negative("schedule.eta_min", *eta_min)?,
            Schedule::WarmRestarts {
                t_0,
                t_mult,
                eta_min,
                every,
            } => {
                if *t_0 == 0 || *t_mult == 0 || *every == 0 {
                    return bad("train.schedule: t_0, t_mult and every must be at least 1".into());
                }
                non_negative("schedule.eta_min", *eta_min)?;
            }
        }
        if let Some(c) = self.grad_clip {
            positive("grad_clip", c)?;
        }
        if let Some(e) = &self.ema {
            if !(0.0..1.0).contains(&e.decay) {
                return bad(format!(
                    "train.ema.decay must be in [0, 1) (got {})",
                    e.decay
                ));
            }
        }
        if self.max_bad_steps == 0 {
            return bad("train.max_bad_steps must be at least 1".into());
        }
        if self.checkpoint.keep == 0 {
            return bad("train.checkpoint.keep must be at least 1".into());
        }
        if self.log_every == 0 {
            return bad("train.log_every must be at least 1".into());
        }
        Ok(())
    }
}
