//! Exponential moving average of the trainable parameters, kept by the trainer (an adapter
//! may keep its own token EMA besides; that one travels in the task's extra state).
use std::collections::BTreeMap;

use tch::Tensor;

use crate::{Error, Result};

pub struct Ema {
    decay: f64,
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    /// Starts from a copy of the current parameters.
    pub fn new(decay: f64, params: &[(String, Tensor)]) -> Self {
        let _guard = tch::no_grad_guard();
        let shadow = params
            .iter()
            .map(|(n, p)| (n.clone(), p.detach().copy()))
            .collect();
        Self { decay, shadow }
    }

    /// shadow <- decay * shadow + (1 - decay) * param, i.e. shadow.lerp_(param, 1 - decay).
    pub fn update(&mut self, params: &[(String, Tensor)]) -> Result<()> {
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
            let _ = s.f_lerp_(&p.detach(), 1.0 - self.decay)?;
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
