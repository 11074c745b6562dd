//! The two pieces of DDPO (Black et al.; ddpo-pytorch scripts/train.py) that turn rewards and
//! per-step log-probabilities (`Ddim::step_with_log_prob`) into a loss, kept apart from the
//! sampling loop so each is checked on its own:
//! - advantages: each reward normalised by the running mean and std of its own prompt's
//!   rewards (ddpo-pytorch's `PerPromptStatTracker`), falling back to the batch's while a
//!   prompt has fewer than `min_count` rewards on record;
//! - the PPO clipped surrogate on one denoising step, with the advantages clipped to
//!   +-`adv_clip_max` (5) and the probability ratio to 1 +- `clip_range` (1e-4).
use std::collections::{BTreeMap, VecDeque};

use softalign_core::{Error, Result};
use tch::{Kind, Tensor};

/// Mean and population std (numpy's `np.std`) of `v`.
fn mean_std(v: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = v.clone().count().max(1) as f64;
    let mean = v.clone().sum::<f64>() / n;
    let var = v.map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Rewards on record per prompt, the newest `buffer_size` of each.
#[derive(Debug, Clone)]
pub struct PerPromptStats {
    buffer_size: usize,
    min_count: usize,
    seen: BTreeMap<String, VecDeque<f64>>,
}

impl PerPromptStats {
    /// ddpo-pytorch's defaults are 16 and 16.
    pub fn new(buffer_size: usize, min_count: usize) -> Result<Self> {
        if buffer_size == 0 {
            return Err(Error::Recipe(
                "ddpo: the per-prompt `buffer_size` must be at least 1".into(),
            ));
        }
        Ok(Self {
            buffer_size,
            min_count,
            seen: BTreeMap::new(),
        })
    }

    /// Records a sampling round's rewards and returns their advantages, in order.
    pub fn advantages(&mut self, prompts: &[String], rewards: &[f64]) -> Result<Vec<f64>> {
        if prompts.len() != rewards.len() {
            return Err(Error::invalid(format!(
                "ddpo: {} prompts for {} rewards",
                prompts.len(),
                rewards.len()
            )));
        }
        let batch = mean_std(rewards.iter().copied());
        let mut out = vec![0.0; rewards.len()];
        let mut order: Vec<&String> = prompts.iter().collect();
        order.sort();
        order.dedup();
        for prompt in order {
            let mine: Vec<usize> = (0..prompts.len())
                .filter(|&i| &prompts[i] == prompt)
                .collect();
            let buf = self.seen.entry(prompt.clone()).or_default();
            for &i in &mine {
                if buf.len() == self.buffer_size {
                    buf.pop_front();
                }
                buf.push_back(rewards[i]);
            }
            let (mean, std) = if buf.len() < self.min_count {
                batch
            } else {
                mean_std(buf.iter().copied())
            };
            for &i in &mine {
                out[i] = (rewards[i] - mean) / (std + 1e-6);
            }
        }
        Ok(out)
    }
}

impl PerPromptStats {
    /// The rewards on record as a table for a checkpoint: one row per prompt of `prompts` (in
    /// that order, the first of duplicates), oldest first, NaN-padded to `buffer_size`.
    pub fn to_table(&self, prompts: &[String]) -> Vec<Vec<f64>> {
        prompts
            .iter()
            .map(|p| {
                let mut row: Vec<f64> = self
                    .seen
                    .get(p)
                    .map(|b| b.iter().copied().collect())
                    .unwrap_or_default();
                row.resize(self.buffer_size, f64::NAN);
                row
            })
            .collect()
    }

    /// Restores what [`Self::to_table`] wrote.
    pub fn load_table(&mut self, prompts: &[String], table: &[Vec<f64>]) -> Result<()> {
        if table.len() != prompts.len() || table.iter().any(|r| r.len() != self.buffer_size) {
            return Err(Error::tensor(
                "ddpo.prompt_rewards",
                format!(
                    "{} rows, expected {} prompts x {} rewards",
                    table.len(),
                    prompts.len(),
                    self.buffer_size
                ),
            ));
        }
        self.seen.clear();
        for (p, row) in prompts.iter().zip(table) {
            let buf: VecDeque<f64> = row.iter().copied().filter(|v| !v.is_nan()).collect();
            if !buf.is_empty() {
                self.seen.insert(p.clone(), buf);
            }
        }
        Ok(())
    }
}

/// Advantages normalised by the round's own mean and std (ddpo-pytorch without per-prompt
/// tracking: `(r - mean) / (std + 1e-8)`).
pub fn round_advantages(rewards: &[f64]) -> Vec<f64> {
    let (mean, std) = mean_std(rewards.iter().copied());
    rewards.iter().map(|r| (r - mean) / (std + 1e-8)).collect()
}

/// What one PPO step on one denoising step gives: the loss and train.py's diagnostics.
pub struct PpoStep {
    pub loss: Tensor,
    /// 0.5 mean (log_prob - old_log_prob)^2.
    pub approx_kl: Tensor,
    /// The fraction of samples whose ratio left 1 +- clip_range.
    pub clip_fraction: Tensor,
}

/// PPO's clipped surrogate: mean over samples of max(-A r, -A clamp(r, 1 - c, 1 + c)), with
/// r = exp(log_prob - old_log_prob) and A the advantages clipped to +-`adv_clip_max`.
pub fn ppo_clipped_loss(
    log_prob: &Tensor,
    old_log_prob: &Tensor,
    advantages: &Tensor,
    clip_range: f64,
    adv_clip_max: f64,
) -> PpoStep {
    let adv = advantages.clamp(-adv_clip_max, adv_clip_max);
    let diff = log_prob - old_log_prob;
    let ratio = diff.exp();
    let unclipped = -&adv * &ratio;
    let clipped = -&adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range);
    let loss = unclipped.maximum(&clipped).mean(Kind::Float);
    let approx_kl = diff.detach().square().mean(Kind::Float) * 0.5;
    let clip_fraction = (ratio.detach() - 1.0)
        .abs()
        .gt(clip_range)
        .to_kind(Kind::Float)
        .mean(Kind::Float);
    PpoStep {
        loss,
        approx_kl,
        clip_fraction,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn advantages_use_the_batch_until_a_prompt_has_min_count_rewards() {
        let mut s = PerPromptStats::new(4, 3).unwrap();
        // Round 1: no prompt has 3 rewards yet: the batch's mean 0.5 and std 0.5.
        let a = s
            .advantages(&p(&["x", "y", "x", "y"]), &[1.0, 0.0, 1.0, 0.0])
            .unwrap();
        let z = 0.5 / (0.5 + 1e-6);
        assert_eq!(a, [z, -z, z, -z]);
        // Round 2: "x" has 3 on record (1, 1, 0): its own mean 2/3 and std sqrt(2)/3.
        let a = s.advantages(&p(&["x", "y"]), &[0.0, 1.0]).unwrap();
        let (m, sd) = (2.0 / 3.0, 2f64.sqrt() / 3.0);
        assert!((a[0] - (0.0 - m) / (sd + 1e-6)).abs() < 1e-12, "{a:?}");
        // "y" also has 3 (0, 0, 1): mean 1/3, same std.
        assert!(
            (a[1] - (1.0 - 1.0 / 3.0) / (sd + 1e-6)).abs() < 1e-12,
            "{a:?}"
        );
        // The buffer keeps the newest 4: two more "x" rewards push out the oldest.
        s.advantages(&p(&["x", "x"]), &[5.0, 5.0]).unwrap();
        assert_eq!(s.seen["x"], [1.0, 0.0, 5.0, 5.0]);
        assert!(s.advantages(&p(&["x"]), &[]).is_err());
    }

    #[test]
    fn ppo_loss_clips_the_ratio_and_the_advantages() {
        let old = Tensor::from_slice(&[0.0f32, 0.0, 0.0]);
        let new = Tensor::from_slice(&[1e-3f32, -1e-3, 0.0]).set_requires_grad(true);
        let adv = Tensor::from_slice(&[1.0f32, 1.0, 9.0]);
        let r = ppo_clipped_loss(&new, &old, &adv, 1e-4, 5.0);
        // Sample 0: r = e^1e-3 > 1 + 1e-4 with A > 0: the clipped term -A (1 + 1e-4) is the
        // larger; sample 1: r < 1 - 1e-4, -A r is the larger; sample 2: r = 1, A clipped to 5.
        let want = (-(1.0 + 1e-4) - (-1e-3f64).exp() - 5.0) / 3.0;
        assert!((r.loss.double_value(&[]) - want).abs() < 1e-6);
        assert!((r.clip_fraction.double_value(&[]) - 2.0 / 3.0).abs() < 1e-6);
        assert!((r.approx_kl.double_value(&[]) - 0.5 * 2e-6 / 3.0).abs() < 1e-9);
        // Only the unclipped sample passes a gradient: d/dlp (-A e^lp / 3) at lp = -1e-3.
        r.loss.backward();
        let g = Vec::<f32>::try_from(new.grad()).unwrap();
        assert_eq!(g[0], 0.0);
        assert!((g[1] as f64 + (-1e-3f64).exp() / 3.0).abs() < 1e-6, "{g:?}");
        assert!((g[2] as f64 + 5.0 / 3.0).abs() < 1e-6, "{g:?}");
    }
}
