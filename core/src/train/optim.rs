//! AdamW on plain tensors, written out so its state can be checkpointed by parameter name
//! (tch's optimizer cannot save its state). It follows torch.optim.AdamW's single-tensor
//! path step for step: decoupled weight decay `p *= 1 - lr * wd`, moments by lerp and
//! multiply-add, bias correction with per-parameter step counts.
use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::config::TrainConfig;
use super::glob::glob_match;
use crate::{Error, Result};

/// The settings of one parameter group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSettings {
    /// The glob from the recipe; `None` for the default group.
    pub pattern: Option<String>,
    /// Base lr, before the schedule.
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
}

struct ParamState {
    name: String,
    param: Tensor,
    group: usize,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

pub struct AdamW {
    groups: Vec<GroupSettings>,
    params: Vec<ParamState>,
}

impl AdamW {
    /// Builds the groups of a `[train]` table: group 0 is the default (train.lr and
    /// train.optimizer), then one per `param_groups` entry; each parameter joins the first
    /// entry whose glob matches its name. A glob that matches no parameter is an error: it is
    /// almost always a typo that would silently train with the wrong settings.
    pub fn from_config(cfg: &TrainConfig, params: &[(String, Tensor)]) -> Result<Self> {
        let o = &cfg.optimizer;
        let mut groups = vec![GroupSettings {
            pattern: None,
            lr: cfg.lr,
            betas: o.betas,
            eps: o.eps,
            weight_decay: o.weight_decay,
        }];
        for g in &cfg.param_groups {
            groups.push(GroupSettings {
                pattern: Some(g.params.clone()),
                lr: g.lr.unwrap_or(cfg.lr),
                betas: g.betas.unwrap_or(o.betas),
                eps: o.eps,
                weight_decay: g.weight_decay.unwrap_or(o.weight_decay),
            });
        }
        let assign = |name: &str| -> usize {
            cfg.param_groups
                .iter()
                .position(|g| glob_match(&g.params, name))
                .map_or(0, |i| i + 1)
        };
        let named: Vec<(String, Tensor, usize)> = params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone(), assign(n)))
            .collect();
        for (i, g) in cfg.param_groups.iter().enumerate() {
            if !named.iter().any(|(_, _, gi)| *gi == i + 1) {
                let some: Vec<&str> = params.iter().take(8).map(|(n, _)| n.as_str()).collect();
                return Err(Error::Recipe(format!(
                    "train.param_groups[{i}].params = \"{}\" matches no trainable parameter \
                     (or only ones an earlier group took); parameters are named like {some:?}",
                    g.params
                )));
            }
        }
        Self::new(groups, named)
    }

    /// Low-level constructor: explicit groups and a group index per parameter.
    pub fn new(groups: Vec<GroupSettings>, params: Vec<(String, Tensor, usize)>) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let mut states = Vec::with_capacity(params.len());
        for (name, param, group) in params {
            if !seen.insert(name.clone()) {
                return Err(Error::tensor(&name, "parameter name given twice"));
            }
            if group >= groups.len() {
                return Err(Error::tensor(&name, format!("no parameter group {group}")));
            }
            if param.kind() != Kind::Float {
                return Err(Error::tensor(
                    &name,
                    format!(
                        "trainable parameters must be fp32, this one is {:?}",
                        param.kind()
                    ),
                ));
            }
            let exp_avg = param.zeros_like().detach();
            let exp_avg_sq = param.zeros_like().detach();
            states.push(ParamState {
                name,
                param,
                group,
                exp_avg,
                exp_avg_sq,
                step: 0,
            });
        }
        Ok(Self {
            groups,
            params: states,
        })
    }

    pub fn groups(&self) -> &[GroupSettings] {
        &self.groups
    }

    /// Which group each parameter belongs to.
    pub fn assignments(&self) -> Vec<(String, usize)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.group))
            .collect()
    }

    /// One optimizer step with `lrs[g]` the current lr of group g. Parameters without a
    /// gradient are left alone, as torch does.
    pub fn step(&mut self, lrs: &[f64]) -> Result<()> {
        if lrs.len() != self.groups.len() {
            return Err(Error::invalid(format!(
                "AdamW::step got {} lrs for {} groups",
                lrs.len(),
                self.groups.len()
            )));
        }
        let _guard = tch::no_grad_guard();
        for s in &mut self.params {
            let grad = s.param.grad();
            if !grad.defined() {
                continue;
            }
            let g = &self.groups[s.group];
            let lr = lrs[s.group];
            let [beta1, beta2] = g.betas;
            s.step += 1;
            let _ = s.param.f_mul_scalar_(1.0 - lr * g.weight_decay)?;
            let _ = s.exp_avg.f_lerp_(&grad, 1.0 - beta1)?;
            let _ = s.exp_avg_sq.f_mul_scalar_(beta2)?;
            let _ = s
                .exp_avg_sq
                .f_add_(&grad.f_mul(&grad)?.f_mul_scalar(1.0 - beta2)?)?;
            // Python float arithmetic in torch: pow on doubles, then one scalar per tensor op.
            let step = s.step as f64;
            let bias_correction1 = 1.0 - beta1.powf(step);
            let bias_correction2 = 1.0 - beta2.powf(step);
            let step_size = lr / bias_correction1;
            let denom = s
                .exp_avg_sq
                .f_sqrt()?
                .f_div_scalar(bias_correction2.sqrt())?
                .f_add_scalar(g.eps)?;
            let update = s.exp_avg.f_div(&denom)?.f_mul_scalar(-step_size)?;
            let _ = s.param.f_add_(&update)?;
        }
        Ok(())
    }

    /// The state as named tensors: `exp_avg/{name}`, `exp_avg_sq/{name}`, `step/{name}`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.params.len() * 3);
        for s in &self.params {
            out.push((format!("exp_avg/{}", s.name), s.exp_avg.shallow_clone()));
            out.push((
                format!("exp_avg_sq/{}", s.name),
                s.exp_avg_sq.shallow_clone(),
            ));
            out.push((format!("step/{}", s.name), Tensor::from(s.step as i64)));
        }
        out
    }

    /// Restores the state written by [`AdamW::state_tensors`]; every parameter must be there
    /// with its shape, and nothing else may be. `origin` names the file in errors.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, origin: &str) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut used = 0usize;
        for s in &mut self.params {
            let get = |key: String| {
                tensors.get(&key).ok_or_else(|| {
                    Error::tensor(&key, format!("missing from the optimizer state {origin}"))
                })
            };
            let m = get(format!("exp_avg/{}", s.name))?;
            let v = get(format!("exp_avg_sq/{}", s.name))?;
            let st = get(format!("step/{}", s.name))?;
            for (key, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                if t.size() != s.param.size() {
                    return Err(Error::tensor(
                        format!("{key}/{}", s.name),
                        format!(
                            "shape {:?} in {origin}, the parameter has {:?}",
                            t.size(),
                            s.param.size()
                        ),
                    ));
                }
            }
            s.exp_avg.f_copy_(m)?;
            s.exp_avg_sq.f_copy_(v)?;
            let step = st.f_int64_value(&[])?;
            s.step = u64::try_from(step).map_err(|_| {
                Error::tensor(format!("step/{}", s.name), format!("negative in {origin}"))
            })?;
            used += 3;
        }
        if used != tensors.len() {
            let known: std::collections::HashSet<String> =
                self.state_tensors().into_iter().map(|(n, _)| n).collect();
            let extra: Vec<&String> = tensors.keys().filter(|k| !known.contains(*k)).collect();
            return Err(Error::invalid(format!(
                "optimizer state {origin} holds tensors for parameters this run does not \
                 train: {extra:?}"
            )));
        }
        Ok(())
    }
}

/// torch.nn.utils.clip_grad_norm_'s total norm: the 2-norm of the per-parameter 2-norms.
/// Returns the tensor (for clipping) and its value (for the finiteness check and the log).
pub fn global_grad_norm(params: &[(String, Tensor)]) -> Result<(Option<Tensor>, f64)> {
    let _guard = tch::no_grad_guard();
    let mut norms = Vec::with_capacity(params.len());
    for (_, p) in params {
        let g = p.grad();
        if g.defined() {
            norms.push(g.f_norm()?);
        }
    }
    if norms.is_empty() {
        return Ok((None, 0.0));
    }
    let total = Tensor::f_stack(&norms, 0)?.f_norm()?;
    let value = total.f_double_value(&[])?;
    Ok((Some(total), value))
}

/// As torch: coef = max_norm / (total + 1e-6), clamped to at most 1, multiplied into every
/// gradient (also when it is 1).
pub fn clip_grads(params: &[(String, Tensor)], total: &Tensor, max_norm: f64) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let coef = total
        .f_add_scalar(1e-6)?
        .f_reciprocal()?
        .f_mul_scalar(max_norm)?
        .f_clamp_max(1.0)?;
    for (_, p) in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.f_mul_(&coef.f_to_kind(Kind::Float)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(lr: f64, wd: f64) -> GroupSettings {
        GroupSettings {
            pattern: None,
            lr,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: wd,
        }
    }

    /// The first AdamW step moves every coordinate by lr * sign(g) (bias-corrected moments
    /// are g and g^2), after decay by (1 - lr * wd).
    #[test]
    fn first_step_is_lr_times_sign() {
        let p = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
        let loss = (&p * Tensor::from_slice(&[0.5f32, -4.0, 0.0])).sum(Kind::Float);
        loss.backward();
        let mut opt = AdamW::new(
            vec![settings(0.1, 0.01)],
            vec![("p".into(), p.shallow_clone(), 0)],
        )
        .unwrap();
        opt.step(&[0.1]).unwrap();
        let got: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
        let decay = 1.0 - 0.1 * 0.01;
        let want = [1.0 * decay - 0.1, -2.0 * decay + 0.1, 3.0 * decay];
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn state_round_trips_and_rejects_strangers() {
        let p = Tensor::ones([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        p.sum(Kind::Float).backward();
        let mut opt = AdamW::new(
            vec![settings(0.1, 0.0)],
            vec![("w".into(), p.shallow_clone(), 0)],
        )
        .unwrap();
        opt.step(&[0.1]).unwrap();
        let state: BTreeMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        let q = Tensor::ones([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let mut other = AdamW::new(vec![settings(0.1, 0.0)], vec![("w".into(), q, 0)]).unwrap();
        other.load_state(&state, "test").unwrap();
        assert_eq!(other.params[0].step, 1);
        assert!(other.params[0].exp_avg.equal(&opt.params[0].exp_avg));
        let mut extra = state;
        extra.insert(
            "exp_avg/ghost".into(),
            Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)),
        );
        let err = other.load_state(&extra, "test").unwrap_err().to_string();
        assert!(err.contains("ghost"), "{err}");
    }

    #[test]
    fn half_parameters_are_refused() {
        let p = Tensor::ones([2], (Kind::Half, tch::Device::Cpu));
        let err = AdamW::new(vec![settings(0.1, 0.0)], vec![("h".into(), p, 0)])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`h`") && err.contains("fp32"), "{err}");
    }
}
