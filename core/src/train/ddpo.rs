//! The `[ddpo]` table: reinforcement learning on the model's own samples (DDPO, Black et al.;
//! ddpo-pytorch's config/base.py), as a trainer mode. A round samples `samples_per_round`
//! trajectories with the current adapters, scores them with the recipe's `[reward]`, turns the
//! rewards into advantages, then trains `inner_epochs` passes over them with PPO's clipped
//! surrogate; `train.images_per_step` trajectories per micro-batch, `train.grad_accum`
//! micro-batches per optimizer step, so a round is
//! `inner_epochs x samples_per_round / (images_per_step x grad_accum)` optimizer steps.
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

fn d_samples() -> usize {
    64
}
fn d_sample_batch() -> usize {
    32
}
fn d_one() -> u32 {
    1
}
fn d_fraction() -> f64 {
    1.0
}
fn d_clip_range() -> f64 {
    1e-4
}
fn d_adv_clip() -> f64 {
    5.0
}
fn d_sixteen() -> usize {
    16
}
fn d_true() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdpoConfig {
    /// The prompts trajectories are sampled for, drawn uniformly with replacement: a GenEval
    /// `evaluation_metadata.jsonl` (its metadata reaches the reward), a text file (one prompt
    /// per line), or `shapes:train`: the shapes world's GenEval prompts that its evaluation set
    /// (prompt seed 0) leaves out, so an evaluation afterwards runs on held-out prompts.
    pub prompts: String,
    /// Trajectories per sampling round (ddpo-pytorch: sample.batch_size x
    /// sample.num_batches_per_epoch x processes).
    #[serde(default = "d_samples")]
    pub samples_per_round: usize,
    /// Trajectories per sampling forward (memory, not the result).
    #[serde(default = "d_sample_batch")]
    pub sample_batch: usize,
    /// Training passes over each round (train.num_inner_epochs).
    #[serde(default = "d_one")]
    pub inner_epochs: u32,
    /// The share of each trajectory's denoising steps trained on, a fresh random subset per
    /// pass (train.timestep_fraction).
    #[serde(default = "d_fraction")]
    pub timestep_fraction: f64,
    /// PPO's ratio clip (train.clip_range).
    #[serde(default = "d_clip_range")]
    pub clip_range: f64,
    /// Advantages are clipped to +- this (train.adv_clip_max).
    #[serde(default = "d_adv_clip")]
    pub adv_clip_max: f64,
    /// Normalise each reward by its own prompt's recent rewards (per_prompt_stat_tracking);
    /// false: by the round's.
    #[serde(default = "d_true")]
    pub per_prompt_stats: bool,
    /// Rewards kept per prompt (per_prompt_stat_tracking.buffer_size).
    #[serde(default = "d_sixteen")]
    pub buffer_size: usize,
    /// Below this many rewards on record a prompt is normalised by the round's statistics
    /// (per_prompt_stat_tracking.min_count).
    #[serde(default = "d_sixteen")]
    pub min_count: usize,
}

impl DdpoConfig {
    /// Checks the table against the `[train]` batch sizes; returns the optimizer steps per round.
    pub fn validate(&self, images_per_step: i64, grad_accum: u32) -> Result<u64> {
        let bad = |m: String| Err(Error::Recipe(format!("ddpo: {m}")));
        if self.samples_per_round == 0 || self.sample_batch == 0 || self.inner_epochs == 0 {
            return bad(
                "`samples_per_round`, `sample_batch` and `inner_epochs` must be at least 1".into(),
            );
        }
        if !(self.timestep_fraction > 0.0 && self.timestep_fraction <= 1.0) {
            return bad(format!(
                "`timestep_fraction` = {} must be in (0, 1]",
                self.timestep_fraction
            ));
        }
        let positive = |v: f64| v > 0.0 && v.is_finite();
        if !positive(self.clip_range) || !positive(self.adv_clip_max) {
            return bad("`clip_range` and `adv_clip_max` must be positive".into());
        }
        if self.buffer_size == 0 {
            return bad("`buffer_size` must be at least 1".into());
        }
        let per_step = images_per_step.max(0) as usize * grad_accum as usize;
        if per_step == 0 || !self.samples_per_round.is_multiple_of(per_step) {
            return bad(format!(
                "`samples_per_round` = {} must be a multiple of train.images_per_step x \
                 train.grad_accum = {per_step}: each optimizer step trains that many \
                 trajectories and a round is used whole",
                self.samples_per_round
            ));
        }
        Ok((self.samples_per_round / per_step) as u64 * self.inner_epochs as u64)
    }
}
