//! diffusers `DDIMScheduler` as the `ddim` sampler: `set_timesteps` with leading / trailing /
//! linspace spacing and `steps_offset`, `step` with eta (given or drawn variance noise),
//! epsilon or v-prediction, and classifier-free guidance with tokens in both branches.
use serde::{Deserialize, Serialize};
use softalign_core::adapter::{Injection, TokenSelection};
use softalign_core::backbone::{Conditioning, Prediction};
use softalign_core::plugin::SamplerSpec;
use softalign_core::sampler::{check_finite, SampleRequest, Sampler, StochasticPolicy};
use softalign_core::site::SiteHook;
use softalign_core::{json_file, register_plugin, Error, Result};
use tch::{Kind, Tensor};

use super::ddpm::{BetaConfig, BetaSchedule};

/// diffusers' `timestep_spacing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Spacing {
    #[default]
    Leading,
    Trailing,
    Linspace,
}

fn default_steps() -> usize {
    30
}
fn one() -> i64 {
    1
}
fn default_range() -> f64 {
    1.0
}
fn default_train() -> i64 {
    1000
}
fn default_beta_start() -> f64 {
    0.00085
}
fn default_beta_end() -> f64 {
    0.012
}

/// The sampler's recipe table. Defaults are Stable Diffusion's scheduler_config.json
/// (scaled-linear betas 0.00085..0.012, leading spacing, steps_offset 1, set_alpha_to_one
/// false, clip_sample false) and the SoftREPA sampling settings (30 steps, eta 0).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdimSpec {
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default)]
    pub eta: f64,
    #[serde(default)]
    pub timestep_spacing: Spacing,
    #[serde(default = "one")]
    pub steps_offset: i64,
    #[serde(default)]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default = "default_range")]
    pub clip_sample_range: f64,
    #[serde(default = "default_train")]
    pub num_train_timesteps: i64,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default)]
    pub beta_schedule: BetaSchedule,
    /// diffusers' `rescale_betas_zero_snr` (see [`BetaConfig`]); needs a v-prediction model.
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Unconditional branch = zeros for every conditioning tensor except `time_ids` (SDXL's
    /// `force_zeros_for_empty_prompt`), instead of the encoded empty prompt.
    #[serde(default)]
    pub zero_uncond: bool,
    /// Classifier-free guidance scale for `sample`, `eval` and `demo` with this recipe (the
    /// command line's `--guidance` wins; unset: 7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
}

impl Default for DdimSpec {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

/// Keys of a diffusers scheduler_config.json that DDIM shares with the schedulers SD folders
/// ship (PNDM, DDIM, Euler...): the noise schedule and the timestep spacing.
pub const SCHEDULER_CONFIG_KEYS: [&str; 10] = [
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "steps_offset",
    "timestep_spacing",
    "set_alpha_to_one",
    "clip_sample",
    "clip_sample_range",
    "rescale_betas_zero_snr",
];

impl DdimSpec {
    /// DDIM with `steps` steps on the schedule of a model folder's scheduler_config.json
    /// (`None`: Stable Diffusion's defaults); keys other schedulers add are ignored.
    pub fn from_scheduler_config(config: Option<&serde_json::Value>, steps: usize) -> Result<Self> {
        let mut spec = serde_json::Map::new();
        for k in SCHEDULER_CONFIG_KEYS {
            if let Some(v) = config.and_then(|c| c.get(k)).filter(|v| !v.is_null()) {
                spec.insert(k.into(), v.clone());
            }
        }
        spec.insert("steps".into(), steps.into());
        json_file::from_value(spec.into()).map_err(|e| {
            Error::invalid(format!(
                "the model's scheduler_config.json does not make a DDIM schedule: {e}"
            ))
        })
    }

    pub fn betas(&self) -> BetaConfig {
        BetaConfig {
            num_train_timesteps: self.num_train_timesteps,
            beta_start: self.beta_start,
            beta_end: self.beta_end,
            beta_schedule: self.beta_schedule,
            rescale_betas_zero_snr: self.rescale_betas_zero_snr,
        }
    }
}

register_plugin!(
    DDIM_ENTRY,
    Sampler,
    "ddim",
    "DDIM (diffusers DDIMScheduler: eta, leading/trailing/linspace spacing) with CFG",
    r#"[sampler]
type = "ddim"
steps = 30
eta = 0.0
timestep_spacing = "leading"
steps_offset = 1
guidance = 7.0
"#
);

#[typetag::serde(name = "ddim")]
impl SamplerSpec for DdimSpec {
    fn validate(&self) -> Result<()> {
        super::validate_guidance("ddim", self.guidance)?;
        Ddim::new(self).map(|_| ())
    }
    fn build(&self) -> Result<Box<dyn Sampler>> {
        Ok(Box::new(Ddim::new(self)?))
    }
}

/// `set_timesteps(steps)`: the model timesteps, first to last.
pub fn timesteps(
    steps: usize,
    num_train: i64,
    spacing: Spacing,
    steps_offset: i64,
) -> Result<Vec<i64>> {
    let bad = |m: String| Err(Error::Recipe(format!("sampler ddim: {m}")));
    if steps == 0 || steps as i64 > num_train {
        return bad(format!("`steps` must be in 1..={num_train} (got {steps})"));
    }
    let n = steps as i64;
    let ts: Vec<i64> = match spacing {
        // np.linspace(0, N - 1, steps).round()[::-1]
        Spacing::Linspace => {
            let stop = (num_train - 1) as f64;
            let step = if n > 1 { stop / (n - 1) as f64 } else { 0.0 };
            (0..n)
                .rev()
                .map(|i| {
                    let v = if i == n - 1 && n > 1 {
                        stop
                    } else {
                        i as f64 * step
                    };
                    v.round_ties_even() as i64
                })
                .collect()
        }
        Spacing::Leading => {
            let ratio = num_train / n;
            (0..n).rev().map(|i| i * ratio + steps_offset).collect()
        }
        // np.round(np.arange(N, 0, -N / steps)) - 1, with numpy's arange arithmetic: length
        // ceil((stop - start) / step), values start + i * (second - first).
        Spacing::Trailing => {
            let start = num_train as f64;
            let step = -(start / n as f64);
            let len = ((0.0 - start) / step).ceil() as i64;
            let delta = (start + step) - start;
            (0..len)
                .map(|i| (start + i as f64 * delta).round_ties_even() as i64 - 1)
                .collect()
        }
    };
    if let Some(t) = ts.iter().find(|t| **t < 0 || **t >= num_train) {
        return bad(format!(
            "timestep {t} falls outside 0..{num_train} (check `steps_offset`)"
        ));
    }
    Ok(ts)
}

pub struct Ddim {
    pub spec: DdimSpec,
    pub timesteps: Vec<i64>,
    alphas_cumprod: Vec<f32>,
}

/// `DDIMScheduler.step`'s outputs.
pub struct StepOutput {
    pub prev_sample: Tensor,
    pub pred_original_sample: Tensor,
}

impl Ddim {
    pub fn new(spec: &DdimSpec) -> Result<Self> {
        let betas = spec.betas();
        betas
            .validate()
            .map_err(|e| Error::Recipe(format!("sampler ddim: {e}")))?;
        if !(spec.eta.is_finite() && spec.eta >= 0.0) {
            return Err(Error::Recipe(format!(
                "sampler ddim: `eta` must be non-negative (got {})",
                spec.eta
            )));
        }
        if !(spec.clip_sample_range.is_finite() && spec.clip_sample_range > 0.0) {
            return Err(Error::Recipe(format!(
                "sampler ddim: `clip_sample_range` must be positive (got {})",
                spec.clip_sample_range
            )));
        }
        let ts = timesteps(
            spec.steps,
            spec.num_train_timesteps,
            spec.timestep_spacing,
            spec.steps_offset,
        )?;
        let ac: Vec<f32> = Vec::<f32>::try_from(&betas.alphas_cumprod())
            .map_err(|e| Error::invalid(format!("alphas_cumprod: {e}")))?;
        Ok(Self {
            spec: spec.clone(),
            timesteps: ts,
            alphas_cumprod: ac,
        })
    }

    /// alphas_cumprod of the training schedule, by timestep (fp32, as diffusers keeps it).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    fn alpha(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else if self.spec.set_alpha_to_one {
            1.0
        } else {
            self.alphas_cumprod[0]
        }
    }

    /// One DDIM step from `t` with diffusers' fp32 arithmetic. `noise` is the variance noise
    /// for eta > 0 (drawn from torch's global generator when None).
    pub fn step(
        &self,
        model_output: &Tensor,
        t: i64,
        sample: &Tensor,
        prediction: Prediction,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        if t < 0 || t as usize >= self.alphas_cumprod.len() {
            return Err(Error::invalid(format!(
                "ddim step: timestep {t} out of range"
            )));
        }
        // diffusers steps back by N // steps whatever the spacing.
        let prev_t = t - self.spec.num_train_timesteps / self.spec.steps as i64;
        let a_t = self.alphas_cumprod[t as usize];
        let a_prev = self.alpha(prev_t);
        let b_t = 1.0f32 - a_t;
        let (sa, sb) = (a_t.sqrt() as f64, b_t.sqrt() as f64);
        let (x0, eps) = match prediction {
            Prediction::Epsilon if sa == 0.0 => {
                return Err(Error::invalid(format!(
                    "sampler ddim: timestep {t} has no signal (rescale_betas_zero_snr), where an \
                     epsilon model's x0 is undefined; zero terminal SNR needs v_prediction"
                )))
            }
            Prediction::Epsilon => (
                (sample - model_output * sb) / sa,
                model_output.shallow_clone(),
            ),
            Prediction::VPrediction => (
                sample * sa - model_output * sb,
                model_output * sa + sample * sb,
            ),
            Prediction::Velocity => {
                return Err(Error::invalid(
                    "sampler ddim: the backbone predicts flow velocity; use flow_match_euler",
                ))
            }
        };
        let x0 = if self.spec.clip_sample {
            let r = self.spec.clip_sample_range;
            x0.clamp(-r, r)
        } else {
            x0
        };
        let b_prev = 1.0f32 - a_prev;
        let variance = (b_prev / b_t) * (1.0f32 - a_t / a_prev);
        let std = self.spec.eta as f32 * variance.sqrt();
        let dir = (1.0f32 - a_prev - std * std).sqrt() as f64;
        let mut prev = &x0 * a_prev.sqrt() as f64 + eps * dir;
        if self.spec.eta > 0.0 {
            let n = match noise {
                Some(n) => n.shallow_clone(),
                None => Tensor::randn_like(model_output),
            };
            prev = &prev + n * std as f64;
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }
}

fn zeros_like_except_time_ids(c: &Conditioning) -> Conditioning {
    Conditioning(
        c.0.iter()
            .map(|(k, v)| {
                let z = if k == "time_ids" {
                    v.shallow_clone()
                } else {
                    v.zeros_like()
                };
                (k.clone(), z)
            })
            .collect(),
    )
}

impl Sampler for Ddim {
    fn name(&self) -> &str {
        "ddim"
    }

    fn as_policy(&self) -> Option<&dyn StochasticPolicy> {
        (self.spec.eta > 0.0).then_some(self as &dyn StochasticPolicy)
    }

    fn sample(&self, req: SampleRequest<'_>) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let bb = req.backbone;
        let prediction = bb.info().prediction;
        let dev = bb.device();
        let mut x = req.noise.to_device(dev).to_kind(Kind::Float);
        let b = x.size()[0];
        let hook_for = |sel: &Option<TokenSelection>| {
            sel.as_ref().map(|s| Injection {
                adapters: req.adapters,
                selection: s.clone(),
            })
        };
        let cond_inj = hook_for(&req.guidance.cond_tokens);
        let uncond_inj = hook_for(&req.guidance.uncond_tokens);
        let cond_hook = cond_inj.as_ref().map(|h| h as &dyn SiteHook);
        let uncond_hook = uncond_inj.as_ref().map(|h| h as &dyn SiteHook);
        let zeros = (self.spec.zero_uncond && req.guidance.scale > 1.0)
            .then(|| zeros_like_except_time_ids(req.cond));
        let uncond = zeros.as_ref().or(req.uncond);
        let cfg = uncond.filter(|_| req.guidance.scale > 1.0);
        let batched = match cfg {
            Some(u) if req.guidance.cond_tokens == req.guidance.uncond_tokens => {
                Some(u.cat(req.cond)?)
            }
            _ => None,
        };
        let bar = req.progress.then(|| {
            let pb = indicatif::ProgressBar::new(self.timesteps.len() as u64);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "sampling {bar:30} {pos}/{len} [{elapsed}<{eta}]",
                )
                .expect("valid template"),
            );
            pb
        });
        let n = self.timesteps.len();
        for (i, &t) in self.timesteps.iter().enumerate() {
            let full = |n: i64| Tensor::full([n], t as f64, (Kind::Float, dev));
            let out = match (cfg, &batched) {
                (Some(_), Some(both)) => {
                    let xx = Tensor::cat(&[&x, &x], 0);
                    let out = bb.forward(&xx, &full(2 * b), both, cond_hook)?;
                    let c = out.to_kind(Kind::Float).chunk(2, 0);
                    &c[0] + (&c[1] - &c[0]) * req.guidance.scale
                }
                (Some(u), None) => {
                    let vu = bb
                        .forward(&x, &full(b), u, uncond_hook)?
                        .to_kind(Kind::Float);
                    let vc = bb
                        .forward(&x, &full(b), req.cond, cond_hook)?
                        .to_kind(Kind::Float);
                    &vu + (vc - &vu) * req.guidance.scale
                }
                (None, _) => bb
                    .forward(&x, &full(b), req.cond, cond_hook)?
                    .to_kind(Kind::Float),
            };
            x = self.step(&out, t, &x, prediction, None)?.prev_sample;
            check_finite(&x, i, n, req.guidance.scale)?;
            if let Some(pb) = &bar {
                pb.inc(1);
            }
        }
        if let Some(pb) = bar {
            pb.finish_and_clear();
        }
        Ok(x)
    }
}
