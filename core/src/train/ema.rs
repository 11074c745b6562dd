//! Exponential moving average of the trainable parameters, kept by the trainer (an adapter
//! may keep its own token EMA besides; that one travels in the task's extra state).
use std::collections::BTreeMap;

use tch::Tensor;

use crate::{Error, Result};

pub struct Ema {
    decay: f64,
    warmup: bool,
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    /// Starts from a copy of the current parameters.
    pub fn new(decay: f64, warmup: bool, params: &[(String, Tensor)]) -> Self {
        let _guard = tch::no_grad_guard();
        let shadow = params
            .iter()
            .map(|(n, p)| (n.clone(), p.detach().copy()))
            .collect();
        Self {
            decay,
            warmup,
            shadow,
        }
    }

    /// The decay used after optimizer step `step` (0-based): the configured one, or with
    /// warm-up diffusers' `EMAModel.get_decay` (s = step: 0 at s = 0, else
    /// min(decay, (1 + s) / (10 + s))).
    pub fn decay_at(&self, step: u64) -> f64 {
        if !self.warmup {
            return self.decay;
        }
        if step == 0 {
            return 0.0;
        }
        let s = step as f64;
        self.decay.min((1.0 + s) / (10.0 + s))
    }

    /// After optimizer step `step` (0-based): shadow <- d * shadow + (1 - d) * param, i.e.
    /// shadow.lerp_(param, 1 - d) with d = [`Ema::decay_at`].
    pub fn update(&mut self, params: &[(String, Tensor)], step: u64) -> Result<()> {
        let decay = self.decay_at(step);
        let _guard = tch::no_grad_guard();
        for ((name, s), (pname, p)) in self.shadow.iter_mut().zip(params) {
            if name != pname {
                return Err(Error::tensor(
                    pname,
                    format!(
                        "EMA expected parameter `{name}` here: the task changed its parameter list"
                    ),
                ));
            }
            let _ = s.f_lerp_(&p.detach(), 1.0 - decay)?;
        }
        Ok(())
    }

    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.shadow
    }

    pub fn load(&mut self, tensors: &BTreeMap<String, Tensor>, origin: &str) -> Result<()> {
        copy_named(&mut self.shadow, tensors, origin)
    }
}

/// Copies `src` into the same-named tensors of `dst` (in place, without grad), requiring the
/// same names and shapes on both sides.
pub fn copy_named(
    dst: &mut [(String, Tensor)],
    src: &BTreeMap<String, Tensor>,
    origin: &str,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for (name, t) in dst.iter_mut() {
        let s = src
            .get(name)
            .ok_or_else(|| Error::tensor(name.as_str(), format!("missing from {origin}")))?;
        if s.size() != t.size() {
            return Err(Error::tensor(
                name.as_str(),
                format!("shape {:?} in {origin}, expected {:?}", s.size(), t.size()),
            ));
        }
        t.f_copy_(s)?;
    }
    if src.len() != dst.len() {
        let extra: Vec<&String> = src
            .keys()
            .filter(|k| !dst.iter().any(|(n, _)| n == *k))
            .collect();
        return Err(Error::invalid(format!(
            "{origin} holds tensors this run does not have: {extra:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn param(v: f64) -> Vec<(String, Tensor)> {
        vec![(
            "w".into(),
            Tensor::full([2], v, (Kind::Double, Device::Cpu)),
        )]
    }

    #[test]
    fn warmup_follows_diffusers_ema_model() {
        let ema = Ema::new(0.999, true, &param(0.0));
        // diffusers EMAModel.get_decay(optimization_step = step + 1), default settings.
        let expect = [(0, 0.0), (1, 2.0 / 11.0), (9, 10.0 / 19.0), (10_000, 0.999)];
        for (step, d) in expect {
            assert!((ema.decay_at(step) - d).abs() < 1e-12, "step {step}");
        }
        assert_eq!(Ema::new(0.9, false, &param(0.0)).decay_at(0), 0.9);
    }

    #[test]
    fn with_warmup_the_first_update_forgets_the_init() {
        let mut plain = Ema::new(0.9, false, &param(0.0));
        let mut ramped = Ema::new(0.9, true, &param(0.0));
        for (step, v) in [(0, 1.0), (1, 2.0)] {
            plain.update(&param(v), step).unwrap();
            ramped.update(&param(v), step).unwrap();
        }
        let at = |e: &Ema| e.tensors()[0].1.double_value(&[0]);
        // Plain: 0.9 * (0.9 * 0 + 0.1 * 1) + 0.1 * 2; ramped: 1 then 2/11 * 1 + 9/11 * 2.
        assert!((at(&plain) - 0.29).abs() < 1e-12, "{}", at(&plain));
        assert!((at(&ramped) - 20.0 / 11.0).abs() < 1e-12, "{}", at(&ramped));
    }
}
