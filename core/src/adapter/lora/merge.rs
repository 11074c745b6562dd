//! Merging LoRA files into frozen weights: W += scale * s * B A (DoRA: then each output row
//! rescaled to its magnitude), computed in fp32 and stored back in W's dtype. Every entry is
//! matched and shape-checked before any weight changes, so a bad file leaves the model as it
//! was.
use std::collections::BTreeMap;

use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::files::{LoraEntry, LoraWeights, ReadContext};
use crate::{Error, Result};

/// A component's weights: a var store and the prefix of the component's names in it (empty
/// when the store holds the component alone).
pub struct WeightTarget<'a> {
    pub component: String,
    pub vs: &'a VarStore,
    pub prefix: String,
}

/// Module paths (names of `.weight` variables with two or more dims, prefix removed) per
/// component: what LoRA keys may name.
pub fn modules(targets: &[WeightTarget]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in targets {
        let mut v: Vec<String> =
            t.vs.variables()
                .into_iter()
                .filter(|(_, w)| w.dim() >= 2)
                .filter_map(|(n, _)| {
                    n.strip_prefix(t.prefix.as_str())
                        .and_then(|n| n.strip_suffix(".weight"))
                        .map(str::to_string)
                })
                .collect();
        v.sort();
        out.entry(t.component.clone()).or_default().extend(v);
    }
    out
}

pub fn read_context(targets: &[WeightTarget], unet_layers_per_block: Option<i64>) -> ReadContext {
    ReadContext {
        default_component: targets
            .first()
            .map(|t| t.component.clone())
            .unwrap_or_default(),
        modules: modules(targets),
        unet_layers_per_block,
    }
}

/// B A as a weight-shaped delta (Linear [out, in]; conv [out, in, kh, kw]).
pub fn delta(e: &LoraEntry, shape: &[i64]) -> Tensor {
    let a = e.down.to_kind(Kind::Float).flatten(1, -1);
    let b = e.up.to_kind(Kind::Float).flatten(1, -1);
    (b.matmul(&a) * e.scale).reshape(shape)
}

/// Finds and checks each entry's weight; returns them in entry order.
pub fn resolve(w: &LoraWeights, targets: &[WeightTarget]) -> Result<Vec<Tensor>> {
    let file = &w.source;
    let mut out = Vec::new();
    for e in &w.entries {
        let t = targets.iter().find(|t| t.component == e.component).ok_or_else(|| {
            let have: Vec<&str> = targets.iter().map(|t| t.component.as_str()).collect();
            Error::file(
                file,
                format!(
                    "key `{}` is for `{}`, which this model does not have ({}): a LoRA for another model?",
                    e.key,
                    e.component,
                    have.join(", ")
                ),
            )
        })?;
        let name = format!("{}{}.weight", t.prefix, e.path);
        let vars = t.vs.variables();
        let weight = vars.get(&name).ok_or_else(|| {
            let mods = modules(std::slice::from_ref(t));
            let all = mods.get(&t.component).cloned().unwrap_or_default();
            let near =
                crate::linear_site::nearest(&e.path, all.iter().map(String::as_str)).unwrap_or("");
            Error::file(
                file,
                format!(
                    "key `{}` matches no module of `{}` (nearest: `{near}`)",
                    e.key, e.component
                ),
            )
        })?;
        let ws = weight.size();
        let (d, u) = (e.down.size(), e.up.size());
        let ok = ws.len() >= 2
            && d.len() == ws.len()
            && u[0] == ws[0]
            && d[1] == ws[1]
            && d[2..] == ws[2..]
            && u[2..].iter().all(|&k| k == 1);
        if !ok {
            return Err(Error::file(
                file,
                format!(
                    "key `{}`: down {d:?} / up {u:?} do not fit `{}.{}` of shape {ws:?} \
                     (expected down [r, {}, ...], up [{}, r, ...])",
                    e.key, e.component, e.path, ws[1], ws[0]
                ),
            ));
        }
        if let Some(m) = &e.magnitude {
            if m.numel() as i64 != ws[0] {
                return Err(Error::file(
                    file,
                    format!(
                        "key `{}`: DoRA magnitude has {} values, `{}` has {} rows",
                        e.key,
                        m.numel(),
                        e.path,
                        ws[0]
                    ),
                ));
            }
        }
        out.push(weight.shallow_clone());
    }
    Ok(out)
}

/// Merges `w` scaled by `scale` into the targets. Returns the number of modules changed.
pub fn merge(w: &LoraWeights, targets: &[WeightTarget], scale: f64) -> Result<usize> {
    let weights = resolve(w, targets)?;
    let _guard = tch::no_grad_guard();
    for (e, mut weight) in w.entries.iter().zip(weights) {
        let shape = weight.size();
        let w0 = weight.to_kind(Kind::Float);
        let merged = &w0 + delta(e, &shape).to_device(w0.device()) * scale;
        let merged = match &e.magnitude {
            // PEFT's DoRA: m * (W + s B A) / ||W + s B A|| per output row.
            Some(m) => {
                let dims: Vec<i64> = (1..shape.len() as i64).collect();
                let norm = merged
                    .square()
                    .sum_dim_intlist(dims.as_slice(), true, Kind::Float)
                    .sqrt();
                let mut mshape = vec![shape[0]];
                mshape.extend(std::iter::repeat_n(1, shape.len() - 1));
                let m = m
                    .to_kind(Kind::Float)
                    .to_device(w0.device())
                    .reshape(mshape.as_slice());
                &merged * (m / norm)
            }
            None => merged,
        };
        weight.copy_(&merged.to_kind(weight.kind()));
    }
    Ok(w.entries.len())
}

/// A LoRA file to merge at load: `[backbone] loras = [{ path = "...", scale = 1.0 }]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraRef {
    pub path: std::path::PathBuf,
    #[serde(default = "one")]
    pub scale: f64,
}

fn one() -> f64 {
    1.0
}

impl LoraRef {
    /// `FILE[:SCALE]`, as `--lora` takes it.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some((p, sc)) = s.rsplit_once(':') {
            if let Ok(scale) = sc.parse::<f64>() {
                return Ok(Self {
                    path: p.into(),
                    scale,
                });
            }
        }
        Ok(Self {
            path: s.into(),
            scale: 1.0,
        })
    }
}

/// Reads `path` (any dialect) against `backbone`'s weights.
pub fn read_for(
    backbone: &dyn crate::backbone::Backbone,
    path: &std::path::Path,
) -> Result<LoraWeights> {
    let targets = backbone.weight_targets();
    if targets.is_empty() {
        return Err(Error::invalid(format!(
            "backbone `{}` does not expose its weights to LoRA files",
            backbone.info().kind
        )));
    }
    let ctx = read_context(&targets, backbone.unet_layers_per_block());
    super::files::read(path, &ctx)
}

/// Merges each LoRA file into `backbone`'s weights, in order (stacking). Relative paths
/// resolve against `dir`.
pub fn merge_all(
    backbone: &dyn crate::backbone::Backbone,
    loras: &[LoraRef],
    dir: &std::path::Path,
) -> Result<()> {
    for l in loras {
        if !l.scale.is_finite() {
            return Err(Error::Recipe(format!(
                "backbone.loras: scale of `{}` is not a finite number",
                l.path.display()
            )));
        }
        let path = if l.path.is_absolute() {
            l.path.clone()
        } else {
            dir.join(&l.path)
        };
        let w = read_for(backbone, &path)?;
        merge(&w, &backbone.weight_targets(), l.scale)?;
    }
    Ok(())
}
