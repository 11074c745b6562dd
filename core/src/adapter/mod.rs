//! Adapters: the small trainable pieces a recipe adds to a frozen backbone.
pub mod lora;
pub mod prompt_init;
pub mod soft_tokens;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::linear_site::LinearBase;
use crate::site::{ContextTokens, SiteHook, SiteInfo};
use crate::{Error, Result};

/// Which tokens a forward uses: a named set (`None`: the adapter's first set) and whether the
/// EMA copy stands in for the online parameters; or no adapter at all (`adapters_off`: the
/// frozen backbone, e.g. Diffusion-DPO's reference model, without a second copy of it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct TokenSelection {
    pub set: Option<String>,
    #[serde(default)]
    pub ema: bool,
    #[serde(default)]
    pub adapters_off: bool,
}

impl TokenSelection {
    /// Every adapter switched off: the forward of the bare backbone.
    pub fn adapters_off() -> Self {
        Self {
            adapters_off: true,
            ..Self::default()
        }
    }
    /// A set of the adapters by name (`None`: each adapter's first set), online or EMA.
    pub fn new(set: Option<String>, ema: bool) -> Self {
        Self {
            set,
            ema,
            adapters_off: false,
        }
    }
    pub fn online(set: &str) -> Self {
        Self::new(Some(set.to_string()), false)
    }
    pub fn ema(set: &str) -> Self {
        Self::new(Some(set.to_string()), true)
    }
}

pub trait Adapter: Send {
    fn kind(&self) -> &'static str;
    /// Online parameters (fp32, requires_grad), named `{set}.{tensor}`.
    fn trainable(&self) -> Vec<(String, Tensor)>;
    /// Everything a checkpoint holds (online and EMA tensors).
    fn state(&self) -> Vec<(String, Tensor)>;
    /// Restores `state()`; a missing, extra or mis-shaped tensor is an error naming it.
    fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()>;
    /// Moves every EMA copy towards its online tensor: ema = decay * ema + (1 - decay) * online.
    fn update_ema(&self, decay: f64);
    fn has_ema(&self) -> bool;
    /// The decay the adapter's own spec gives its EMA copies (None: it keeps none). The
    /// trainer passes it to `update_ema` after every optimizer step.
    fn ema_decay(&self) -> Option<f64> {
        None
    }
    fn token_sets(&self) -> Vec<String>;
    /// Metadata written into the adapter file (kind, sites, shapes, ...).
    fn metadata(&self) -> BTreeMap<String, String>;
    /// Tokens for a text-context site (soft tokens); None: the adapter does not act there.
    fn context_tokens(
        &self,
        site: &SiteInfo,
        t: &Tensor,
        batch: i64,
        sel: &TokenSelection,
    ) -> Result<Option<ContextTokens>> {
        let _ = (site, t, batch, sel);
        Ok(None)
    }
    /// Whether the adapter acts at linear sites (`linear_delta` may return something).
    fn acts_on_linears(&self) -> bool {
        false
    }
    /// What the Linear layer named `site` adds to its output for input `x` (LoRA), `base`
    /// being the frozen layer and its output (DoRA rescales it).
    fn linear_delta(
        &self,
        site: &str,
        x: &Tensor,
        base: &LinearBase<'_>,
        sel: &TokenSelection,
    ) -> Result<Option<Tensor>> {
        let _ = (site, x, base, sel);
        Ok(None)
    }
    /// Takes what the adapter needs from the frozen weights it will act on, once the backbone
    /// is loaded and before any checkpoint is restored (DoRA: each magnitude starts at its
    /// weight's row norms, as PEFT initialises it).
    fn bind_weights(&mut self, weights: &tch::nn::VarStore) -> Result<()> {
        let _ = weights;
        Ok(())
    }
    /// Parameters per trainable tensor group, for `recipe check` and logs (default: the
    /// element count of `trainable`).
    fn parameter_count(&self) -> i64 {
        self.trainable().iter().map(|(_, t)| t.numel() as i64).sum()
    }
    /// Extra files a run's `final/` holds besides the adapter file (LoRA: the diffusers and
    /// PEFT files), written into `dir`.
    fn export(&self, dir: &std::path::Path) -> Result<()> {
        let _ = dir;
        Ok(())
    }
}

/// The adapters of a run with one token selection: what a backbone forward calls at its sites.
pub struct Injection<'a> {
    pub adapters: &'a [Box<dyn Adapter>],
    pub selection: TokenSelection,
}

impl SiteHook for Injection<'_> {
    fn context_tokens(
        &self,
        site: &SiteInfo,
        t: &Tensor,
        batch: i64,
    ) -> Result<Option<ContextTokens>> {
        if self.selection.adapters_off {
            return Ok(None);
        }
        let mut found: Option<ContextTokens> = None;
        for a in self.adapters {
            let Some(ct) = a.context_tokens(site, t, batch, &self.selection)? else {
                continue;
            };
            found = Some(match found {
                None => ct,
                Some(prev)
                    if prev.space == ct.space && prev.offset.is_none() && ct.offset.is_none() =>
                {
                    ContextTokens {
                        tokens: Tensor::cat(&[prev.tokens, ct.tokens], 1),
                        space: ct.space,
                        offset: None,
                    }
                }
                Some(_) => {
                    return Err(Error::invalid(format!(
                        "site `{}`: two adapters give tokens there; they can only be stacked when \
                         both live in the same space without a time table",
                        site.name
                    )))
                }
            });
        }
        Ok(found)
    }

    fn has_linear_deltas(&self) -> bool {
        !self.selection.adapters_off && self.adapters.iter().any(|a| a.acts_on_linears())
    }

    /// The sum of every adapter's delta at `site` (LoRA and DoRA sets stack additively).
    fn linear_delta(
        &self,
        site: &str,
        x: &Tensor,
        base: &LinearBase<'_>,
    ) -> Result<Option<Tensor>> {
        if self.selection.adapters_off {
            return Ok(None);
        }
        let mut sum: Option<Tensor> = None;
        for a in self.adapters {
            if let Some(d) = a.linear_delta(site, x, base, &self.selection)? {
                sum = Some(match sum {
                    None => d,
                    Some(s) => s + d,
                });
            }
        }
        Ok(sum)
    }
}

/// Reads an adapter file of one kind (registered per kind in [`ADAPTER_LOADERS`]).
pub struct AdapterLoader {
    pub kind: &'static str,
    pub load: fn(
        &std::path::Path,
        &crate::backbone::BackboneInfo,
        tch::Device,
    ) -> Result<Box<dyn Adapter>>,
}

#[linkme::distributed_slice]
pub static ADAPTER_LOADERS: [AdapterLoader];

#[linkme::distributed_slice(ADAPTER_LOADERS)]
static SOFT_TOKENS_LOADER: AdapterLoader = AdapterLoader {
    kind: soft_tokens::KIND,
    load: |p, info, dev| Ok(Box::new(soft_tokens::SoftTokens::load(p, info, dev)?)),
};

#[linkme::distributed_slice(ADAPTER_LOADERS)]
static LORA_LOADER: AdapterLoader = AdapterLoader {
    kind: lora::KIND,
    load: |p, info, dev| Ok(Box::new(lora::Lora::load(p, info, dev)?)),
};

/// Writes an adapter's tensors and metadata (its own plus `extra`: step, recipe hash, ...)
/// atomically to a safetensors file.
pub fn save_adapter(
    path: &std::path::Path,
    adapter: &dyn Adapter,
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    let mut meta = adapter.metadata();
    meta.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    crate::tensors::save_safetensors(path, &adapter.state(), &meta)
}

/// Loads an adapter file of any registered kind for `backbone`.
pub fn load_adapter(
    path: &std::path::Path,
    backbone: &crate::backbone::BackboneInfo,
    device: tch::Device,
) -> Result<Box<dyn Adapter>> {
    let meta = crate::tensors::MappedSafetensors::open(path)?.metadata()?;
    let kind = meta
        .get("adapter")
        .ok_or_else(|| Error::file(path, "no `adapter` metadata: not a softalign adapter file"))?;
    let loader = ADAPTER_LOADERS
        .iter()
        .find(|l| l.kind == kind)
        .ok_or_else(|| Error::file(path, format!("unknown adapter kind `{kind}`")))?;
    (loader.load)(path, backbone, device)
}

/// Opens an adapter file of `kind` written for `backbone` and parses its `spec` metadata:
/// the checks every adapter kind's loader makes before building itself (`label` names the
/// kind in errors: "soft tokens", "LoRA").
pub fn open_adapter_file<S: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    kind: &str,
    label: &str,
    backbone: &crate::backbone::BackboneInfo,
) -> Result<(crate::tensors::MappedSafetensors, S)> {
    let file = crate::tensors::MappedSafetensors::open(path)?;
    let meta = file.metadata()?;
    let get = |k: &str| {
        meta.get(k)
            .ok_or_else(|| Error::file(path, format!("metadata field `{k}` missing")))
    };
    if get("adapter")? != kind {
        return Err(Error::file(
            path,
            format!("holds a `{}` adapter, not {label}", get("adapter")?),
        ));
    }
    // An adapter trained for another backbone type would fail on its sites later; say what it
    // is instead.
    if let Some(trained) = meta.get("backbone").filter(|b| **b != backbone.kind) {
        return Err(Error::file(
            path,
            format!(
                "was trained for a `{trained}` backbone; this model is a `{}` backbone",
                backbone.kind
            ),
        ));
    }
    let spec = serde_json::from_str(get("spec")?)
        .map_err(|e| Error::file(path, format!("metadata `spec`: {e}")))
        .and_then(|v| {
            crate::json_file::from_value(v)
                .map_err(|e| Error::file(path, format!("metadata `spec`: {e}")))
        })?;
    Ok((file, spec))
}

/// An adapter's `load_state`: copies `tensors` into its state tensors `ours` (fp32, on their
/// device), requiring exactly the same names and shapes, and naming any that differ.
pub fn load_named_state(
    ours: Vec<(String, Tensor)>,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let expected: std::collections::BTreeSet<&str> = ours.iter().map(|(n, _)| n.as_str()).collect();
    let extra: Vec<&str> = tensors
        .keys()
        .map(String::as_str)
        .filter(|k| !expected.contains(k))
        .collect();
    if !extra.is_empty() {
        return Err(Error::invalid(format!(
            "unexpected tensors: {}",
            extra.join(", ")
        )));
    }
    let _guard = tch::no_grad_guard();
    for (name, mut dst) in ours {
        let src = tensors
            .get(&name)
            .ok_or_else(|| Error::tensor(&name, "missing"))?;
        if src.size() != dst.size() {
            return Err(Error::tensor(
                &name,
                format!("shape {:?}, expected {:?}", src.size(), dst.size()),
            ));
        }
        dst.copy_(&src.to_kind(tch::Kind::Float).to_device(dst.device()));
    }
    Ok(())
}
