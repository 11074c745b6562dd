//! FlowEdit (Kulikov et al. 2024, `FlowEdit_utils.py` `FlowEditSD3`): inversion-free editing
//! with a flow-matching model. Instead of inverting the source image, it integrates the
//! difference of the target and source velocities along noisy copies of the source:
//!
//! for the steps i with T - i <= n_max (timesteps from FlowMatch Euler's schedule, t_i = t/1000):
//! - while T - i > n_min: V = mean over n_avg draws of eps of v_tar(z_tar) - v_src(z_src), with
//!   z_src = (1 - t_i) x_src + t_i eps and z_tar = z_edit + z_src - x_src; the four forwards
//!   [z_src, z_src, z_tar, z_tar] x [src_null, src, tar_null, tar] run as one batch, and
//!   v = u + s (c - u) (the standard CFG formula, src and tar scales apart);
//!   z_edit += (t_{i+1} - t_i) V, in fp32;
//! - the last n_min steps sample the target from the edit so far (SDEdit-style): at the first
//!   of them x_tar = z_edit + (1 - t_i) x_src + t_i eps - x_src, then Euler steps with the
//!   target's guided velocity (two forwards batched). FlowEdit's own branch for this reads an
//!   undefined `noise_pred_tar`; the velocity it computes just before is the one meant.
//!
//! Soft tokens and LoRA act in every branch through one hook (SoftREPA's `edit_sd3.py` puts its
//! tokens in all four). Noise comes from the caller, so seeds stay theirs.
use softalign_core::adapter::{Adapter, Injection, TokenSelection};
use softalign_core::backbone::{Backbone, Conditioning};
use softalign_core::site::SiteHook;
use softalign_core::{Error, Result};
use tch::{Kind, Tensor};

use super::flow_match_euler::schedule;

/// FlowEdit's settings; the defaults are its SD3 experiment's (`SD3_exp.yaml`).
#[derive(Debug, Clone, PartialEq)]
pub struct FlowEditSettings {
    /// T: the schedule's length (FlowMatch Euler with `shift`).
    pub steps: usize,
    /// Editing starts at step T - n_max (n_max = T: from pure noise).
    pub n_max: usize,
    /// The last n_min steps sample the target instead of following the velocity difference.
    pub n_min: usize,
    /// Noise draws averaged per step.
    pub n_avg: usize,
    /// CFG scale of the source branch, standard formula u + s (c - u).
    pub src_guidance: f64,
    /// CFG scale of the target branch, standard formula.
    pub tar_guidance: f64,
    /// FlowMatch Euler's timestep shift (SD3: 3).
    pub shift: f64,
}

impl Default for FlowEditSettings {
    fn default() -> Self {
        Self {
            steps: 50,
            n_max: 33,
            n_min: 0,
            n_avg: 1,
            src_guidance: 3.5,
            tar_guidance: 13.5,
            shift: 3.0,
        }
    }
}

impl FlowEditSettings {
    /// Refuses settings FlowEdit's loop cannot run (its own code would skip the tail's start
    /// when n_min > n_max and then read an unset latent).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(format!("FlowEdit: {m}")));
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.n_max == 0 || self.n_max > self.steps {
            return bad(format!(
                "--n-max {} must be between 1 and --steps ({})",
                self.n_max, self.steps
            ));
        }
        if self.n_min > self.n_max {
            return bad(format!(
                "--n-min {} must be at most --n-max {}",
                self.n_min, self.n_max
            ));
        }
        if self.n_avg == 0 {
            return bad("--n-avg must be at least 1".into());
        }
        for (flag, g) in [
            ("--src-guidance", self.src_guidance),
            ("--tar-guidance", self.tar_guidance),
        ] {
            if !(g.is_finite() && g >= 0.0) {
                return bad(format!("{flag} {g}: must be a finite number >= 0"));
            }
        }
        schedule(self.steps, self.shift).map(|_| ())
    }

    /// The first step that runs, and the first of the n_min sampling steps.
    pub fn phases(&self) -> (usize, usize) {
        (self.steps - self.n_max, self.steps - self.n_min)
    }

    /// Backbone forwards per image: four per draw while editing, two per sampling step.
    pub fn forwards_per_image(&self) -> usize {
        4 * self.n_avg * (self.n_max - self.n_min) + 2 * self.n_min
    }
}

/// One batch of edits: B source latents and the four conditionings, B rows each.
pub struct FlowEditRequest<'a> {
    pub backbone: &'a dyn Backbone,
    pub adapters: &'a [Box<dyn Adapter>],
    /// The tokens every branch uses; `None`: the bare backbone (LoRA merged at load stays).
    pub tokens: Option<TokenSelection>,
    /// Clean source latents (B, C, H, W): the posterior mode, scaled as the model expects.
    pub x_src: &'a Tensor,
    pub src: &'a Conditioning,
    pub src_null: &'a Conditioning,
    pub tar: &'a Conditioning,
    pub tar_null: &'a Conditioning,
}

/// Which noise the loop asks for: draw `k` of an editing step, or the tail's single draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    Edit { step: usize, k: usize },
    Tail { step: usize },
}

impl Draw {
    /// A running index, distinct per draw of one edit: `step * n_avg + k`, the tail's
    /// at its own step (no editing draw uses that step).
    pub fn index(self, n_avg: usize) -> u64 {
        match self {
            Draw::Edit { step, k } => (step * n_avg + k) as u64,
            Draw::Tail { step } => (step * n_avg) as u64,
        }
    }
}

/// Rows of several conditionings stacked in order.
pub fn stack_conditioning(parts: &[&Conditioning]) -> Result<Conditioning> {
    let first = parts
        .first()
        .ok_or_else(|| Error::invalid("no conditioning to stack"))?;
    let mut out = Conditioning::new();
    for name in first.0.keys() {
        let tensors = parts
            .iter()
            .map(|c| c.get(name).map(Tensor::shallow_clone))
            .collect::<Result<Vec<_>>>()?;
        out = out.with(name, Tensor::cat(&tensors, 0));
    }
    if parts.iter().any(|c| c.0.len() != first.0.len()) {
        return Err(Error::invalid(
            "FlowEdit's four conditionings hold different tensors",
        ));
    }
    Ok(out)
}

fn guided(u: &Tensor, c: &Tensor, scale: f64) -> Tensor {
    u + (c - u) * scale
}

/// Runs FlowEdit; `noise(draw)` returns a (B, C, H, W) draw (any device). Returns the edited
/// latents (fp32), `on_step` is called after every step that ran.
pub fn flow_edit(
    req: &FlowEditRequest<'_>,
    s: &FlowEditSettings,
    mut noise: impl FnMut(Draw) -> Result<Tensor>,
    mut on_step: impl FnMut(),
) -> Result<Tensor> {
    s.validate()?;
    let _guard = tch::no_grad_guard();
    let bb = req.backbone;
    let dev = bb.device();
    let x_src = req.x_src.to_device(dev).to_kind(Kind::Float);
    let b = x_src.size()[0];
    for (name, c) in [
        ("source", req.src),
        ("source null", req.src_null),
        ("target", req.tar),
        ("target null", req.tar_null),
    ] {
        let cb = c.batch()?;
        if cb != b {
            return Err(Error::tensor(
                "conditioning",
                format!("the {name} prompt has {cb} rows for {b} source latents"),
            ));
        }
    }
    let injection = req.tokens.as_ref().map(|sel| Injection {
        adapters: req.adapters,
        selection: sel.clone(),
    });
    let hook = injection.as_ref().map(|h| h as &dyn SiteHook);
    let four = stack_conditioning(&[req.src_null, req.src, req.tar_null, req.tar])?;
    let two = stack_conditioning(&[req.tar_null, req.tar])?;
    let sched = schedule(s.steps, s.shift)?;
    let ts = &sched.timesteps;
    let (first, tail) = s.phases();
    let draw = |noise: &mut dyn FnMut(Draw) -> Result<Tensor>, d: Draw| -> Result<Tensor> {
        let e = noise(d)?.to_device(dev).to_kind(Kind::Float);
        if e.size() != x_src.size() {
            return Err(Error::tensor(
                "noise",
                format!("shape {:?} for latents {:?}", e.size(), x_src.size()),
            ));
        }
        Ok(e)
    };
    let mut z_edit = x_src.shallow_clone();
    let mut x_tar: Option<Tensor> = None;
    for i in first..s.steps {
        // FlowEdit's t_i and t_{i-1}: the timestep over 1000 in fp32, 0 after the last.
        let t_i = ts[i] / 1000.0;
        let t_next = ts.get(i + 1).map_or(0.0, |t| t / 1000.0);
        // In fp32 as FlowEdit's tensor arithmetic: the step and the source's weight.
        let dt = (t_next - t_i) as f64;
        let keep = (1.0f32 - t_i) as f64;
        let t_i = t_i as f64;
        if i < tail {
            let tt = Tensor::full([4 * b], ts[i] as f64, (Kind::Float, dev));
            let mut v_delta = x_src.zeros_like();
            for k in 0..s.n_avg {
                let eps = draw(&mut noise, Draw::Edit { step: i, k })?;
                let z_src = &x_src * keep + &eps * t_i;
                let z_tar = &z_edit + &z_src - &x_src;
                let input = Tensor::cat(&[&z_src, &z_src, &z_tar, &z_tar], 0);
                let v = bb.forward(&input, &tt, &four, hook)?.to_kind(Kind::Float);
                let v = v.chunk(4, 0);
                let v_src = guided(&v[0], &v[1], s.src_guidance);
                let v_tar = guided(&v[2], &v[3], s.tar_guidance);
                v_delta += (v_tar - v_src) / s.n_avg as f64;
            }
            z_edit = &z_edit + v_delta * dt;
            check(&z_edit, i, s)?;
        } else {
            let x = match x_tar.take() {
                Some(x) => x,
                None => {
                    let eps = draw(&mut noise, Draw::Tail { step: i })?;
                    let x_noisy = &x_src * keep + &eps * t_i;
                    &z_edit + x_noisy - &x_src
                }
            };
            let tt = Tensor::full([2 * b], ts[i] as f64, (Kind::Float, dev));
            let input = Tensor::cat(&[&x, &x], 0);
            let v = bb.forward(&input, &tt, &two, hook)?.to_kind(Kind::Float);
            let v = v.chunk(2, 0);
            let x = x + guided(&v[0], &v[1], s.tar_guidance) * dt;
            check(&x, i, s)?;
            x_tar = Some(x);
        }
        on_step();
    }
    Ok(x_tar.unwrap_or(z_edit))
}

/// Stops once the latents are no longer finite (a huge guidance scale): decoding them would
/// write black images and report success.
fn check(x: &Tensor, step: usize, s: &FlowEditSettings) -> Result<()> {
    if x.isfinite().all().int64_value(&[]) != 0 {
        return Ok(());
    }
    Err(Error::tensor(
        "latents",
        format!(
            "not finite after FlowEdit step {} of {} (guidance {} / {}); lower the guidance",
            step + 1,
            s.steps,
            s.src_guidance,
            s.tar_guidance
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_flowedits_and_phases_follow_them() {
        let s = FlowEditSettings::default();
        s.validate().unwrap();
        // For 50 / 33 FlowEdit starts at i = 17.
        assert_eq!(s.phases(), (17, 50));
        assert_eq!(s.forwards_per_image(), 4 * 33);
        let tail = FlowEditSettings { n_min: 5, ..s };
        assert_eq!(tail.phases(), (17, 45));
        assert_eq!(tail.forwards_per_image(), 4 * 28 + 2 * 5);
    }

    #[test]
    fn impossible_settings_are_errors() {
        let base = FlowEditSettings::default();
        for (s, needle) in [
            (
                FlowEditSettings {
                    n_max: 51,
                    ..base.clone()
                },
                "--n-max",
            ),
            (
                FlowEditSettings {
                    n_max: 0,
                    ..base.clone()
                },
                "--n-max",
            ),
            (
                FlowEditSettings {
                    n_min: 34,
                    ..base.clone()
                },
                "--n-min",
            ),
            (
                FlowEditSettings {
                    n_avg: 0,
                    ..base.clone()
                },
                "--n-avg",
            ),
            (
                FlowEditSettings {
                    tar_guidance: f64::NAN,
                    ..base.clone()
                },
                "--tar-guidance",
            ),
            (
                FlowEditSettings {
                    steps: 0,
                    ..base.clone()
                },
                "--steps",
            ),
        ] {
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn draw_indices_are_distinct() {
        let mut seen = std::collections::BTreeSet::new();
        for step in 0..10 {
            for k in 0..3 {
                assert!(seen.insert(Draw::Edit { step, k }.index(3)));
            }
        }
        assert!(seen.insert(Draw::Tail { step: 10 }.index(3)));
    }
}
