//! diffusers `FlowMatchEulerDiscreteScheduler` (static shift, no dynamic shifting) as the
//! `flow_match_euler` sampler, with classifier-free guidance.
use serde::{Deserialize, Serialize};
use softalign_core::adapter::Injection;
use softalign_core::plugin::SamplerSpec;
use softalign_core::sampler::{check_finite, SampleRequest, Sampler};
use softalign_core::site::SiteHook;
use softalign_core::{register_plugin, Error, Result};
use tch::{Kind, Tensor};

const NUM_TRAIN_TIMESTEPS: usize = 1000;

/// The inference schedule: `timesteps[i]` (model timesteps) and `sigmas[i]` with a trailing 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
}

/// `set_timesteps(steps)` of a scheduler built with `shift`. Reproduces diffusers' arithmetic
/// and precision: the training sigmas are shifted in fp32 at construction, the inference
/// sigmas are spaced linearly between their ends in fp64 and shifted again, then rounded to
/// fp32 (the shift is applied twice to the end points, as diffusers does).
pub fn schedule(steps: usize, shift: f64) -> Result<Schedule> {
    if steps == 0 {
        return Err(Error::Recipe(
            "sampler flow_match_euler: `steps` must be at least 1".into(),
        ));
    }
    if !(shift.is_finite() && shift > 0.0) {
        return Err(Error::Recipe(format!(
            "sampler flow_match_euler: `shift` must be positive (got {shift})"
        )));
    }
    let n = NUM_TRAIN_TIMESTEPS as f32;
    let shift32 = shift as f32;
    let shift_f32 = |s: f32| shift32 * s / (1.0 + (shift32 - 1.0) * s);
    // The first training sigma is 1000 / 1000 = 1.
    let sigma_max = shift_f32(1.0) as f64;
    let sigma_min = shift_f32(1.0 / n) as f64;
    let (start, stop) = (sigma_max * 1000.0, sigma_min * 1000.0);
    let ts: Vec<f64> = if steps == 1 {
        vec![start]
    } else {
        let step = (stop - start) / (steps - 1) as f64;
        let mut v: Vec<f64> = (0..steps).map(|i| i as f64 * step + start).collect();
        v[steps - 1] = stop;
        v
    };
    let sigmas: Vec<f32> = ts
        .iter()
        .map(|t| {
            let s = t / 1000.0;
            (shift * s / (1.0 + (shift - 1.0) * s)) as f32
        })
        .collect();
    let timesteps = sigmas.iter().map(|s| s * 1000.0).collect();
    let mut sigmas = sigmas;
    sigmas.push(0.0);
    Ok(Schedule { timesteps, sigmas })
}

fn default_steps() -> usize {
    28
}
fn default_shift() -> f64 {
    3.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowMatchEulerSpec {
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// SD3's scheduler config uses 3.0.
    #[serde(default = "default_shift")]
    pub shift: f64,
    /// Classifier-free guidance scale for `sample`, `eval` and `demo` with this recipe (the
    /// command line's `--guidance` wins; unset: 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
}

impl Default for FlowMatchEulerSpec {
    fn default() -> Self {
        Self {
            steps: default_steps(),
            shift: default_shift(),
            guidance: None,
        }
    }
}

register_plugin!(
    FLOW_MATCH_EULER_ENTRY,
    Sampler,
    "flow_match_euler",
    "FlowMatch Euler (diffusers FlowMatchEulerDiscreteScheduler, static shift) with CFG",
    r#"[sampler]
type = "flow_match_euler"
steps = 28
shift = 3.0
guidance = 4.0
"#
);

#[typetag::serde(name = "flow_match_euler")]
impl SamplerSpec for FlowMatchEulerSpec {
    fn validate(&self) -> Result<()> {
        super::validate_guidance("flow_match_euler", self.guidance)?;
        schedule(self.steps, self.shift).map(|_| ())
    }
    fn build(&self) -> Result<Box<dyn Sampler>> {
        Ok(Box::new(FlowMatchEuler {
            schedule: schedule(self.steps, self.shift)?,
        }))
    }
}

pub struct FlowMatchEuler {
    pub schedule: Schedule,
}

impl Sampler for FlowMatchEuler {
    fn name(&self) -> &str {
        "flow_match_euler"
    }

    fn sample(&self, req: SampleRequest<'_>) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let bb = req.backbone;
        let dev = bb.device();
        let mut x = req.noise.to_device(dev);
        let b = x.size()[0];
        let hook_for = |sel: &Option<softalign_core::adapter::TokenSelection>| {
            sel.as_ref().map(|s| Injection {
                adapters: req.adapters,
                selection: s.clone(),
            })
        };
        let cond_inj = hook_for(&req.guidance.cond_tokens);
        let uncond_inj = hook_for(&req.guidance.uncond_tokens);
        let cond_hook = cond_inj.as_ref().map(|h| h as &dyn SiteHook);
        let uncond_hook = uncond_inj.as_ref().map(|h| h as &dyn SiteHook);
        let cfg = req.uncond.filter(|_| req.guidance.scale > 1.0);
        // One batched forward [uncond, cond] when both branches use the same tokens, as the
        // diffusers pipeline does.
        let batched = match cfg {
            Some(u) if req.guidance.cond_tokens == req.guidance.uncond_tokens => {
                Some(u.cat(req.cond)?)
            }
            _ => None,
        };
        let n = self.schedule.timesteps.len();
        let bar = req.progress.then(|| {
            let pb = indicatif::ProgressBar::new(n as u64);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "sampling {bar:30} {pos}/{len} [{elapsed}<{eta}]",
                )
                .expect("valid template"),
            );
            pb
        });
        for i in 0..n {
            let t = self.schedule.timesteps[i] as f64;
            let v = match (cfg, &batched) {
                (Some(_), Some(both)) => {
                    let xx = Tensor::cat(&[&x, &x], 0);
                    let tt = Tensor::full([2 * b], t, (Kind::Float, dev));
                    let out = bb.forward(&xx, &tt, both, cond_hook)?;
                    let c = out.chunk(2, 0);
                    &c[0] + (&c[1] - &c[0]) * req.guidance.scale
                }
                (Some(u), None) => {
                    let tt = Tensor::full([b], t, (Kind::Float, dev));
                    let vu = bb.forward(&x, &tt, u, uncond_hook)?;
                    let vc = bb.forward(&x, &tt, req.cond, cond_hook)?;
                    &vu + (vc - &vu) * req.guidance.scale
                }
                (None, _) => {
                    let tt = Tensor::full([b], t, (Kind::Float, dev));
                    bb.forward(&x, &tt, req.cond, cond_hook)?
                }
            };
            let dt = self.schedule.sigmas[i + 1] - self.schedule.sigmas[i];
            let vk = v.kind();
            x = (x.to_kind(Kind::Float) + v * dt as f64).to_kind(vk);
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
