//! DDPO as a trainer mode (Black et al.; ddpo-pytorch scripts/train.py): the task samples its
//! own data. Each round draws `samples_per_round` prompts (uniformly, with replacement),
//! samples their trajectories with the stochastic sampler and the current adapters under
//! classifier-free guidance, records every step's latents and log-probability, scores the final
//! images with the reward, and turns rewards into advantages (per prompt, see
//! [`PerPromptStats`]). Training then makes `inner_epochs` passes over the round in a fresh
//! order each: a micro-batch re-runs the guided model on a random subset of each trajectory's
//! steps (a fresh subset per pass) and backpropagates PPO's clipped surrogate, averaged over
//! the steps it trains.
//!
//! Everything a round draws (prompts, noise, orders) comes from torch's global generator at
//! the round's first micro-step, which the trainer seeds from (seed, step, micro); the round
//! itself is part of the checkpoint, so a run stopped mid-round resumes bit for bit.
use std::collections::BTreeMap;
use std::path::Path;

use softalign_core::adapter::{Adapter, Injection, TokenSelection};
use softalign_core::backbone::{Backbone, Conditioning};
use softalign_core::reward::{Reward, RewardPrompt};
use softalign_core::sampler::{check_finite, Sampler, StochasticPolicy};
use softalign_core::site::SiteHook;
use softalign_core::train::ddpo::DdpoConfig;
use softalign_core::train::{MicroStep, TrainConfig, TrainTask};
use softalign_core::{Error, Result};
use tch::{Device, Kind, Tensor};

use crate::ddpo::{ppo_clipped_loss, round_advantages, PerPromptStats};
use crate::task::{
    adapter_ema_state, adapter_parameters, export_adapters, load_adapter_ema_state,
    update_adapter_emas,
};

/// One sampling round: everything training on it needs.
struct Round {
    index: u64,
    /// (N, T + 1, C, H, W): the noise, then the latents after each step.
    latents: Tensor,
    /// (N, T): log-probability of each step under the sampling policy.
    log_probs: Tensor,
    /// (N,) float.
    advantages: Tensor,
    /// (N,) Int64: rows of the prompt list.
    prompt_ids: Tensor,
    /// (N,) float, for the logs.
    rewards: Tensor,
    /// (E, N): the order of each training pass.
    sample_order: Tensor,
    /// (E, N, T): the order of each trajectory's steps in each pass.
    step_order: Tensor,
}

const ROUND_KEYS: [&str; 8] = [
    "ddpo.round",
    "ddpo.latents",
    "ddpo.log_probs",
    "ddpo.advantages",
    "ddpo.prompt_ids",
    "ddpo.rewards",
    "ddpo.sample_order",
    "ddpo.step_order",
];

pub struct DdpoTask {
    backbone: Box<dyn Backbone>,
    adapters: Vec<Box<dyn Adapter>>,
    reward: Box<dyn Reward>,
    sampler: Box<dyn Sampler>,
    guidance: f64,
    /// The tokens both guidance branches use (no effect for LoRA).
    selection: TokenSelection,
    prompts: Vec<RewardPrompt>,
    texts: Vec<String>,
    /// Every prompt encoded once, (P, ...) on the device.
    cond: Conditioning,
    /// The empty prompt, one row.
    null: Conditioning,
    sample_shape: [i64; 3],
    config: DdpoConfig,
    images_per_step: i64,
    micros_per_round: u64,
    grad_accum: u64,
    stats: PerPromptStats,
    round: Option<Round>,
    params: Vec<(String, Tensor)>,
    pub export_metadata: BTreeMap<String, String>,
}

/// What builds a [`DdpoTask`] besides the backbone and adapters.
pub struct DdpoParts {
    pub reward: Box<dyn Reward>,
    pub sampler: Box<dyn Sampler>,
    pub guidance: f64,
    pub selection: TokenSelection,
    pub prompts: Vec<RewardPrompt>,
    pub config: DdpoConfig,
}

impl DdpoTask {
    pub fn new(
        backbone: Box<dyn Backbone>,
        adapters: Vec<Box<dyn Adapter>>,
        parts: DdpoParts,
        train: &TrainConfig,
    ) -> Result<Self> {
        let steps_per_round = parts
            .config
            .validate(train.images_per_step, train.grad_accum)?;
        if parts.sampler.as_policy().is_none() {
            return Err(Error::Recipe(format!(
                "ddpo: sampler `{}` has no step densities; DDPO samples with DDIM and eta > 0 \
                 ([sampler] type = \"ddim\", eta = 1.0 as ddpo-pytorch)",
                parts.sampler.name()
            )));
        }
        if adapters.is_empty() {
            return Err(Error::Recipe(
                "ddpo: the policy's trainable part is its adapters; add an [[adapter]] (LoRA \
                 or soft tokens)"
                    .into(),
            ));
        }
        if parts.prompts.is_empty() {
            return Err(Error::Recipe("ddpo: the prompt list is empty".into()));
        }
        let sample_shape = backbone.sample_shape().ok_or_else(|| {
            Error::Recipe(format!(
                "ddpo: backbone `{}` does not say its sample size",
                backbone.info().kind
            ))
        })?;
        let texts: Vec<String> = parts.prompts.iter().map(|p| p.text.clone()).collect();
        let (cond, null) = {
            let _guard = tch::no_grad_guard();
            (
                backbone.encode_prompts(&texts)?,
                backbone.null_conditioning()?,
            )
        };
        let stats = PerPromptStats::new(parts.config.buffer_size, parts.config.min_count)?;
        let params = adapter_parameters(&adapters);
        Ok(Self {
            backbone,
            adapters,
            reward: parts.reward,
            sampler: parts.sampler,
            guidance: parts.guidance,
            selection: parts.selection,
            prompts: parts.prompts,
            texts,
            cond,
            null,
            sample_shape,
            config: parts.config,
            images_per_step: train.images_per_step,
            micros_per_round: steps_per_round * train.grad_accum as u64,
            grad_accum: train.grad_accum as u64,
            stats,
            round: None,
            params,
            export_metadata: BTreeMap::new(),
        })
    }

    fn policy(&self) -> &dyn StochasticPolicy {
        self.sampler
            .as_policy()
            .expect("checked to be a policy at construction")
    }

    /// The guided model output for latents `x` at per-sample `timesteps`, prompts `cond`.
    fn guided(&self, x: &Tensor, timesteps: &[i64], cond: &Conditioning) -> Result<Tensor> {
        let dev = self.backbone.device();
        let b = x.size()[0];
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_slice(&t).to_device(dev);
        let inj = Injection {
            adapters: &self.adapters,
            selection: self.selection.clone(),
        };
        let hook = Some(&inj as &dyn SiteHook);
        if self.guidance <= 1.0 {
            return Ok(self
                .backbone
                .forward(x, &t, cond, hook)?
                .to_kind(Kind::Float));
        }
        let uncond = self
            .null
            .index_select(&Tensor::zeros([b], (Kind::Int64, Device::Cpu)));
        let both = uncond.cat(cond)?;
        let out = self.backbone.forward(
            &Tensor::cat(&[x, x], 0),
            &Tensor::cat(&[&t, &t], 0),
            &both,
            hook,
        )?;
        let c = out.to_kind(Kind::Float).chunk(2, 0);
        Ok(&c[0] + (&c[1] - &c[0]) * self.guidance)
    }

    /// Samples and scores round `index` (see the module's notes).
    fn sample_round(&mut self, index: u64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let dev = self.backbone.device();
        let n = self.config.samples_per_round as i64;
        let steps = self.policy().timesteps().to_vec();
        let t_count = steps.len() as i64;
        let cpu = (Kind::Int64, Device::Cpu);
        let prompt_ids = Tensor::randint(self.prompts.len() as i64, [n], cpu);
        let [c, h, w] = self.sample_shape;
        let noise = Tensor::randn([n, c, h, w], (Kind::Float, Device::Cpu));
        let epochs = self.config.inner_epochs as i64;
        let sample_order = Tensor::stack(
            &(0..epochs)
                .map(|_| Tensor::randperm(n, cpu))
                .collect::<Vec<_>>(),
            0,
        );
        let step_order = Tensor::stack(
            &(0..epochs * n)
                .map(|_| Tensor::randperm(t_count, cpu))
                .collect::<Vec<_>>(),
            0,
        )
        .reshape([epochs, n, t_count]);
        let prediction = self.backbone.info().prediction;
        let ids: Vec<i64> = Vec::try_from(&prompt_ids)?;
        let (mut latents, mut log_probs, mut rewards) = (Vec::new(), Vec::new(), Vec::new());
        for (chunk_no, chunk) in ids.chunks(self.config.sample_batch).enumerate() {
            let first = (chunk_no * self.config.sample_batch) as i64;
            let b = chunk.len() as i64;
            let cond = self.cond.index_select(&Tensor::from_slice(chunk));
            let mut x = noise.narrow(0, first, b).to_device(dev);
            let mut traj = vec![x.shallow_clone()];
            let mut lps = Vec::with_capacity(steps.len());
            for (i, &t) in steps.iter().enumerate() {
                let ts = vec![t; b as usize];
                let out = self.guided(&x, &ts, &cond)?;
                let s = self
                    .policy()
                    .step_with_log_prob(&out, &ts, &x, prediction, None)?;
                x = s.prev_sample;
                check_finite(&x, i, steps.len(), self.guidance)?;
                traj.push(x.shallow_clone());
                lps.push(s.log_prob);
            }
            let images = self.backbone.decode(&x)?;
            let asked: Vec<RewardPrompt> = chunk
                .iter()
                .map(|&p| self.prompts[p as usize].clone())
                .collect();
            rewards.extend(self.reward.score(&images, &asked)?);
            latents.push(Tensor::stack(&traj, 1));
            log_probs.push(Tensor::stack(&lps, 1));
        }
        let texts: Vec<String> = ids
            .iter()
            .map(|&p| self.texts[p as usize].clone())
            .collect();
        let advantages = if self.config.per_prompt_stats {
            self.stats.advantages(&texts, &rewards)?
        } else {
            round_advantages(&rewards)
        };
        let f32s = |v: &[f64]| Tensor::from_slice(&v.iter().map(|&x| x as f32).collect::<Vec<_>>());
        self.round = Some(Round {
            index,
            latents: Tensor::cat(&latents, 0),
            log_probs: Tensor::cat(&log_probs, 0),
            advantages: f32s(&advantages).to_device(dev),
            prompt_ids,
            rewards: f32s(&rewards),
            sample_order,
            step_order,
        });
        Ok(())
    }

    /// Trains micro-batch `k` of the current round; returns (loss, approx_kl, clip_fraction).
    fn train_micro(&self, k: u64, loss_scale: f64) -> Result<(f64, f64, f64)> {
        let r = self
            .round
            .as_ref()
            .expect("a round is sampled before training");
        let b = self.images_per_step;
        let per_epoch = self.config.samples_per_round as u64 / b as u64;
        let (epoch, j) = ((k / per_epoch) as i64, (k % per_epoch) as i64);
        let idx = r.sample_order.get(epoch).narrow(0, j * b, b);
        let dev = self.backbone.device();
        let idx_dev = idx.to_device(dev);
        let latents = r.latents.index_select(0, &idx_dev);
        let old = r.log_probs.index_select(0, &idx_dev);
        let adv = r.advantages.index_select(0, &idx_dev);
        let cond = self.cond.index_select(&r.prompt_ids.index_select(0, &idx));
        let order: Vec<Vec<i64>> = Vec::try_from(r.step_order.get(epoch).index_select(0, &idx))?;
        let steps = self.policy().timesteps();
        let t_count = steps.len();
        let trained = ((t_count as f64 * self.config.timestep_fraction) as usize).max(1);
        let prediction = self.backbone.info().prediction;
        let (mut loss, mut kl, mut clipped) = (0.0, 0.0, 0.0);
        for s in 0..trained {
            let at: Vec<i64> = order.iter().map(|o| o[s]).collect();
            let pick = |off: i64| -> Tensor {
                Tensor::stack(
                    &at.iter()
                        .enumerate()
                        .map(|(i, &a)| latents.get(i as i64).get(a + off))
                        .collect::<Vec<_>>(),
                    0,
                )
            };
            let (x, next) = (pick(0), pick(1));
            let ts: Vec<i64> = at.iter().map(|&a| steps[a as usize]).collect();
            let old_lp = old.gather(
                1,
                &Tensor::from_slice(&at).to_device(dev).unsqueeze(1),
                false,
            );
            let out = self.guided(&x, &ts, &cond)?;
            let step = self
                .policy()
                .step_with_log_prob(&out, &ts, &x, prediction, Some(&next))?;
            let ppo = ppo_clipped_loss(
                &step.log_prob,
                &old_lp.squeeze_dim(1),
                &adv,
                self.config.clip_range,
                self.config.adv_clip_max,
            );
            (&ppo.loss * (loss_scale / trained as f64)).backward();
            loss += ppo.loss.double_value(&[]) / trained as f64;
            kl += ppo.approx_kl.double_value(&[]) / trained as f64;
            clipped += ppo.clip_fraction.double_value(&[]) / trained as f64;
        }
        Ok((loss, kl, clipped))
    }
}

impl TrainTask for DdpoTask {
    fn parameters(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    fn extra_state(&self) -> Vec<(String, Tensor)> {
        let mut out = adapter_ema_state(&self.adapters);
        if let Some(r) = &self.round {
            let table = self.stats.to_table(&self.texts);
            let flat: Vec<f64> = table.concat();
            let stats = Tensor::from_slice(&flat)
                .reshape([self.texts.len() as i64, self.config.buffer_size as i64]);
            out.extend([
                (ROUND_KEYS[0].into(), Tensor::from_slice(&[r.index as i64])),
                (ROUND_KEYS[1].into(), r.latents.shallow_clone()),
                (ROUND_KEYS[2].into(), r.log_probs.shallow_clone()),
                (ROUND_KEYS[3].into(), r.advantages.shallow_clone()),
                (ROUND_KEYS[4].into(), r.prompt_ids.shallow_clone()),
                (ROUND_KEYS[5].into(), r.rewards.shallow_clone()),
                (ROUND_KEYS[6].into(), r.sample_order.shallow_clone()),
                (ROUND_KEYS[7].into(), r.step_order.shallow_clone()),
                ("ddpo.prompt_rewards".into(), stats),
            ]);
        }
        out
    }

    fn load_extra_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        load_adapter_ema_state(&self.adapters, tensors)?;
        if !tensors.contains_key(ROUND_KEYS[0]) {
            return Ok(());
        }
        let get = |k: &str| {
            tensors
                .get(k)
                .map(Tensor::shallow_clone)
                .ok_or_else(|| Error::tensor(k, "missing from the checkpoint"))
        };
        let dev = self.backbone.device();
        let stats = get("ddpo.prompt_rewards")?;
        let table: Vec<Vec<f64>> = Vec::try_from(stats.to_kind(Kind::Double))
            .map_err(|_| Error::tensor("ddpo.prompt_rewards", "not a (prompts, buffer) table"))?;
        self.stats.load_table(&self.texts, &table)?;
        let r = Round {
            index: get(ROUND_KEYS[0])?.int64_value(&[0]) as u64,
            latents: get(ROUND_KEYS[1])?.to_device(dev),
            log_probs: get(ROUND_KEYS[2])?.to_device(dev),
            advantages: get(ROUND_KEYS[3])?.to_device(dev),
            prompt_ids: get(ROUND_KEYS[4])?,
            rewards: get(ROUND_KEYS[5])?,
            sample_order: get(ROUND_KEYS[6])?,
            step_order: get(ROUND_KEYS[7])?,
        };
        let n = self.config.samples_per_round as i64;
        let t = self.policy().timesteps().len() as i64;
        if r.latents.size().first() != Some(&n) || r.log_probs.size() != [n, t] {
            return Err(Error::tensor(
                "ddpo.latents",
                format!(
                    "a round of {:?} trajectories, expected {n} of {t} steps (ddpo.samples_per_round or the sampler's steps changed since the checkpoint)",
                    r.log_probs.size()
                ),
            ));
        }
        self.round = Some(r);
        Ok(())
    }

    fn micro_step(&mut self, m: &MicroStep) -> Result<BTreeMap<String, f64>> {
        let micros = self.micros_per_round;
        let global = m.step * self.grad_accum + m.micro as u64;
        let (index, k) = (global / micros, global % micros);
        if self.round.as_ref().is_none_or(|r| r.index != index) {
            self.sample_round(index)?;
        }
        let (loss, kl, clipped) = self.train_micro(k, m.loss_scale)?;
        let r = self.round.as_ref().expect("sampled above");
        let mut out = BTreeMap::new();
        out.insert("loss".into(), loss);
        out.insert("approx_kl".into(), kl);
        out.insert("clip_fraction".into(), clipped);
        out.insert(
            "reward_mean".into(),
            r.rewards.mean(Kind::Float).double_value(&[]),
        );
        out.insert("reward_std".into(), r.rewards.std(false).double_value(&[]));
        out.insert("round".into(), r.index as f64);
        Ok(out)
    }

    fn after_step(&mut self, _step: u64) -> Result<()> {
        update_adapter_emas(&self.adapters);
        Ok(())
    }

    fn export(&self, dir: &Path, step: u64) -> Result<()> {
        export_adapters(&self.adapters, dir, step, &self.export_metadata)
    }
}
