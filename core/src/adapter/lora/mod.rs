//! LoRA (Hu et al. 2021) at a backbone's linear sites: y = W x + s * B(A(dropout(x))), A [r, in]
//! and B [out, r] trainable in fp32, B = 0 at the start, s = alpha / r (or alpha / sqrt r with
//! rslora). Named sets with EMA copies, as soft tokens have, so AGSM's positive / negative
//! objective runs with LoRA too.
//!
//! DoRA (Liu et al. 2024, PEFT `use_dora`) adds a trainable magnitude m [out] per site, started
//! at the frozen weight's row norms: y = m / ||W + s B A||_row * (W x + s B A x) + bias, the
//! norm detached as PEFT detaches it.
//!
//! Tensor layout of the adapter file (checkpoints, `final/adapter.safetensors`):
//! `{set}.{site}.lora_A.weight`, `{set}.{site}.lora_B.weight` (DoRA:
//! `{set}.{site}.lora_magnitude_vector`), `ema.{set}.{site}.lora_*`.
//! `final/` also holds the diffusers and PEFT files ([`export`]). Files from other tools are
//! read by [`files`].
pub mod export;
pub mod files;
pub mod kohya;
pub mod merge;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::adapter::{Adapter, TokenSelection};
use crate::backbone::BackboneInfo;
use crate::linear_site::{LinearBase, LinearSite};
use crate::plugin::{AdapterSpec, BuildContext};
use crate::site::SiteSelector;
use crate::{register_plugin, Error, Result};

pub const KIND: &str = "lora";

/// The SD3 DreamBooth LoRA script's default targets (train_dreambooth_lora_sd3.py): the
/// eight projections of every joint attention.
pub const SD3_TARGETS: [&str; 8] = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
];
/// The SD1.5 / SDXL scripts' UNet targets.
pub const UNET_TARGETS: [&str; 4] = ["to_k", "to_q", "to_v", "to_out.0"];
/// The scripts' text-encoder targets.
pub const TEXT_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

/// How A starts (B is always zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// PEFT's default: kaiming_uniform(a = sqrt 5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    #[default]
    Kaiming,
    /// N(0, (1/r)^2), what the diffusers scripts use (`init_lora_weights="gaussian"`).
    Gaussian,
}

fn default_sets() -> Vec<String> {
    vec!["default".to_string()]
}
fn default_decay() -> f64 {
    0.9999
}
fn default_rank() -> i64 {
    4
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    #[serde(default = "default_rank")]
    pub rank: i64,
    /// Default: the rank (scale 1).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Scale alpha / sqrt(rank) instead of alpha / rank (PEFT `use_rslora`).
    #[serde(default)]
    pub rslora: bool,
    /// Module-name suffixes as PEFT matches them (`attn.to_q` matches
    /// `transformer_blocks.3.attn.to_q`, not `attn2.to_q`). Default: the training script's
    /// list for the component (SD3: the eight attention projections; UNet: to_q/k/v/out.0;
    /// text encoders: q/k/v/out_proj).
    #[serde(default)]
    pub targets: Option<Vec<String>>,
    /// Only modules under these (the SD3 script's `--lora_blocks`):
    /// `"transformer_blocks[0..5]"`, `["down_blocks.1", "mid_block"]`.
    #[serde(default)]
    pub blocks: Option<SiteSelector>,
    /// Which component's linears (`transformer`, `unet`, `text_encoder`, ...). Default: the
    /// denoiser (the backbone's first).
    #[serde(default)]
    pub component: Option<String>,
    #[serde(default)]
    pub init: LoraInit,
    /// Dropout on the LoRA input while training (PEFT `lora_dropout`).
    #[serde(default)]
    pub dropout: f64,
    /// DoRA (PEFT `use_dora`): a trainable magnitude per output row besides A and B.
    #[serde(default)]
    pub use_dora: bool,
    /// Named sets (AGSM: ["positive", "negative"]).
    #[serde(default = "default_sets")]
    pub sets: Vec<String>,
    #[serde(default)]
    pub ema: bool,
    #[serde(default = "default_decay")]
    pub ema_decay: f64,
}

register_plugin!(
    LORA_ENTRY,
    Adapter,
    "lora",
    "LoRA at linear sites: rank, alpha, PEFT suffix targets, block selector, named sets with EMA",
    r#"[[adapter]]
type = "lora"
rank = 4
alpha = 4.0
blocks = "transformer_blocks[0..5]"
targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
"#
);

#[typetag::serde(name = "lora")]
impl AdapterSpec for LoraSpec {
    fn token_sets(&self) -> Vec<(String, bool)> {
        self.sets.iter().map(|s| (s.clone(), self.ema)).collect()
    }

    fn validate(&self, backbone: &BackboneInfo) -> Result<()> {
        self.layout(backbone).map(|_| ())
    }

    fn build(&self, backbone: &BackboneInfo, ctx: &BuildContext) -> Result<Box<dyn Adapter>> {
        let layout = self.layout(backbone)?;
        Ok(Box::new(Lora::new(self, layout, ctx.device)))
    }

    /// r * (in + out) per adapted module (DoRA: + out), per set.
    fn trainable_parameters(&self, backbone: &BackboneInfo) -> Result<Option<i64>> {
        let l = self.layout(backbone)?;
        let dora = i64::from(l.dora);
        let per: i64 = l
            .sites
            .iter()
            .map(|s| {
                s.rank * (s.site.in_features + s.site.out_features) + dora * s.site.out_features
            })
            .sum();
        Ok(Some(per * l.sets.len() as i64))
    }
}

/// One adapted Linear: the site, its rank and its scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSite {
    pub site: LinearSite,
    pub rank: i64,
    pub scale: f64,
}

/// A spec resolved against a backbone.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub backbone: String,
    pub sites: Vec<LoraSite>,
    pub rank: i64,
    pub alpha: f64,
    pub rslora: bool,
    pub dropout: f64,
    pub dora: bool,
    pub sets: Vec<String>,
    pub ema: bool,
}

impl Layout {
    /// Site name -> position in `sites`.
    fn site_index(&self) -> BTreeMap<String, usize> {
        self.sites
            .iter()
            .enumerate()
            .map(|(k, s)| (s.site.name.clone(), k))
            .collect()
    }
}

/// PEFT's module-name suffix rule: `name == target` or `name` ends with `.target`.
pub fn suffix_match(name: &str, target: &str) -> bool {
    name == target || name.strip_suffix(target).is_some_and(|r| r.ends_with('.'))
}

/// alpha / r, or alpha / sqrt(r) (rslora).
pub fn scale(alpha: f64, rank: i64, rslora: bool) -> f64 {
    if rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

impl LoraSpec {
    fn default_targets(component: &str) -> Vec<String> {
        let t: &[&str] = match component {
            "transformer" => &SD3_TARGETS,
            "unet" => &UNET_TARGETS,
            _ => &TEXT_TARGETS,
        };
        t.iter().map(|s| s.to_string()).collect()
    }

    pub fn layout(&self, backbone: &BackboneInfo) -> Result<Layout> {
        let field = |f: &str, msg: String| Error::Recipe(format!("adapter lora: `{f}` {msg}"));
        if self.rank <= 0 {
            return Err(field(
                "rank",
                format!("must be at least 1 (got {})", self.rank),
            ));
        }
        let alpha = self.alpha.unwrap_or(self.rank as f64);
        if !alpha.is_finite() || alpha <= 0.0 {
            return Err(field(
                "alpha",
                format!("must be a positive number (got {alpha})"),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(field(
                "dropout",
                format!("must be in [0, 1) (got {})", self.dropout),
            ));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(field(
                "ema_decay",
                format!("must be in [0, 1) (got {})", self.ema_decay),
            ));
        }
        if self.sets.is_empty() {
            return Err(field("sets", "must name at least one set".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.sets {
            if s.is_empty() || s.contains('.') || s == "ema" || !seen.insert(s) {
                return Err(field(
                    "sets",
                    format!("`{s}` is empty, contains '.', is `ema`, or repeats"),
                ));
            }
        }
        if backbone.linear_sites.is_empty() {
            return Err(Error::Recipe(format!(
                "adapter lora: backbone `{}` exposes no linear sites",
                backbone.kind
            )));
        }
        let component = match &self.component {
            Some(c) => c.clone(),
            None => backbone.linear_sites[0].component.clone(),
        };
        let mine: Vec<&LinearSite> = backbone
            .linear_sites
            .iter()
            .filter(|s| s.component == component)
            .collect();
        if mine.is_empty() {
            let mut comps: Vec<&str> = backbone
                .linear_sites
                .iter()
                .map(|s| s.component.as_str())
                .collect();
            comps.dedup();
            return Err(field(
                "component",
                format!(
                    "`{component}` is not a component of this backbone ({})",
                    comps.join(", ")
                ),
            ));
        }
        let paths: Vec<&str> = mine.iter().map(|s| s.path.as_str()).collect();
        let under = match &self.blocks {
            Some(sel) => sel
                .select_under(&paths)
                .map_err(|e| field("blocks", e.to_string()))?,
            None => vec![true; paths.len()],
        };
        let targets = self
            .targets
            .clone()
            .unwrap_or_else(|| Self::default_targets(&component));
        if targets.is_empty() {
            return Err(field("targets", "is empty".into()));
        }
        for t in &targets {
            if !paths.iter().any(|p| suffix_match(p, t)) {
                // Compare with each path's tail of as many dotted parts as the target has.
                let parts = t.split('.').count();
                let tails: Vec<(String, &str)> = paths
                    .iter()
                    .map(|p| {
                        let v: Vec<&str> = p.split('.').collect();
                        (v[v.len().saturating_sub(parts)..].join("."), *p)
                    })
                    .collect();
                let near = crate::linear_site::nearest(t, tails.iter().map(|(t, _)| t.as_str()))
                    .and_then(|n| tails.iter().find(|(t, _)| t == n))
                    .map_or("", |(_, p)| *p);
                return Err(field(
                    "targets",
                    format!("`{t}` matches no Linear module of `{component}` (nearest: `{near}`)"),
                ));
            }
        }
        let s = scale(alpha, self.rank, self.rslora);
        let sites: Vec<LoraSite> = mine
            .iter()
            .zip(&under)
            .filter(|(site, u)| **u && targets.iter().any(|t| suffix_match(&site.path, t)))
            .map(|(site, _)| LoraSite {
                site: (*site).clone(),
                rank: self.rank,
                scale: s,
            })
            .collect();
        if sites.is_empty() {
            return Err(field(
                "targets",
                "select no module inside the chosen `blocks`".to_string(),
            ));
        }
        Ok(Layout {
            backbone: backbone.kind.clone(),
            sites,
            rank: self.rank,
            alpha,
            rslora: self.rslora,
            dropout: self.dropout,
            dora: self.use_dora,
            sets: self.sets.clone(),
            ema: self.ema,
        })
    }
}

/// A and B of one site, and DoRA's magnitude [out].
pub struct Pair {
    pub a: Tensor,
    pub b: Tensor,
    pub m: Option<Tensor>,
}

impl Pair {
    fn shallow_clone(&self) -> Pair {
        Pair {
            a: self.a.shallow_clone(),
            b: self.b.shallow_clone(),
            m: self.m.as_ref().map(Tensor::shallow_clone),
        }
    }
    fn copy(&self) -> Pair {
        Pair {
            a: self.a.copy(),
            b: self.b.copy(),
            m: self.m.as_ref().map(Tensor::copy),
        }
    }
    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        [&self.a, &self.b].into_iter().chain(self.m.as_ref())
    }
}

pub struct Lora {
    layout: Layout,
    /// Site name -> index into layout.sites.
    index: BTreeMap<String, usize>,
    /// Online pairs per set, per site (layout order); fp32, requires_grad.
    online: BTreeMap<String, Vec<Pair>>,
    ema: BTreeMap<String, Vec<Pair>>,
    ema_decay: f64,
    /// The spec it was built from (metadata; the file's key and shapes follow from it).
    spec: LoraSpec,
    /// DoRA's magnitudes hold real values (bound to the frozen weights, or restored from a
    /// file); always true without DoRA.
    magnitudes_ready: bool,
}

impl Lora {
    /// Fresh tensors for `layout`: A drawn as `spec.init` says, B zero, EMA copies equal.
    pub fn new(spec: &LoraSpec, layout: Layout, dev: Device) -> Self {
        let draw = |s: &LoraSite| -> Pair {
            let (r, i, o) = (s.rank, s.site.in_features, s.site.out_features);
            let a = match spec.init {
                LoraInit::Kaiming => {
                    let bound = 1.0 / (i as f64).sqrt();
                    Tensor::rand([r, i], (Kind::Float, dev)) * (2.0 * bound) - bound
                }
                LoraInit::Gaussian => Tensor::randn([r, i], (Kind::Float, dev)) / r as f64,
            };
            Pair {
                a,
                b: Tensor::zeros([o, r], (Kind::Float, dev)),
                // Placeholder until `bind_weights` sets the frozen weight's row norms.
                m: layout.dora.then(|| Tensor::ones([o], (Kind::Float, dev))),
            }
        };
        let mut online = BTreeMap::new();
        let mut ema = BTreeMap::new();
        for set in &layout.sets {
            let pairs: Vec<Pair> = layout.sites.iter().map(draw).collect();
            if layout.ema {
                ema.insert(set.clone(), pairs.iter().map(Pair::copy).collect());
            }
            let pairs = pairs
                .into_iter()
                .map(|p| Pair {
                    a: p.a.set_requires_grad(true),
                    b: p.b.set_requires_grad(true),
                    m: p.m.map(|m| m.set_requires_grad(true)),
                })
                .collect();
            online.insert(set.clone(), pairs);
        }
        let index = layout.site_index();
        let magnitudes_ready = !layout.dora;
        Self {
            layout,
            index,
            online,
            ema,
            ema_decay: spec.ema_decay,
            spec: spec.clone(),
            magnitudes_ready,
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The same adapter sharing every tensor (gradients and updates show in both).
    pub fn shallow_clone(&self) -> Lora {
        let sc = |m: &BTreeMap<String, Vec<Pair>>| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.iter().map(Pair::shallow_clone).collect()))
                .collect()
        };
        Lora {
            layout: self.layout.clone(),
            index: self.index.clone(),
            online: sc(&self.online),
            ema: sc(&self.ema),
            ema_decay: self.ema_decay,
            spec: self.spec.clone(),
            magnitudes_ready: self.magnitudes_ready,
        }
    }

    /// The pairs of `set` (online), in layout order.
    pub fn pairs(&self, set: &str, ema: bool) -> Option<&[Pair]> {
        let t = if ema { &self.ema } else { &self.online };
        t.get(set).map(Vec::as_slice)
    }

    /// Loads an adapter file written by [`crate::adapter::save_adapter`] for `backbone`.
    pub fn load(path: &Path, backbone: &BackboneInfo, device: Device) -> Result<Self> {
        let (file, spec): (_, LoraSpec) =
            crate::adapter::open_adapter_file(path, KIND, "LoRA", backbone)?;
        let layout = spec
            .layout(backbone)
            .map_err(|e| Error::file(path, format!("does not fit the backbone: {e}")))?;
        let mut a = Lora::new(&spec, layout, device);
        a.load_state(&file.all().map_err(|e| Error::file(path, e))?)
            .map_err(|e| Error::file(path, e))?;
        Ok(a)
    }

    /// An adapter holding a LoRA file's weights unmerged (one set, `default`), for checking a
    /// merge against the unmerged forward and for benches. Every entry must be a Linear site
    /// of `backbone`.
    pub fn from_weights(
        w: &files::LoraWeights,
        backbone: &BackboneInfo,
        user_scale: f64,
    ) -> Result<Self> {
        let mut sites = Vec::new();
        let mut pairs = Vec::new();
        for e in &w.entries {
            let site = backbone
                .linear_sites
                .iter()
                .find(|s| s.component == e.component && s.path == e.path)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "{}: `{}.{}` is not a Linear site of this backbone (unmerged LoRA acts \
                         at Linear layers only)",
                        w.source.display(),
                        e.component,
                        e.path
                    ))
                })?;
            if e.magnitude.is_some() {
                return Err(Error::invalid(format!(
                    "{}: DoRA entries can only be merged",
                    w.source.display()
                )));
            }
            sites.push(LoraSite {
                site: site.clone(),
                rank: e.down.size()[0],
                scale: e.scale * user_scale,
            });
            pairs.push(Pair {
                a: e.down.flatten(1, -1).to_kind(Kind::Float),
                b: e.up.flatten(1, -1).to_kind(Kind::Float),
                m: None,
            });
        }
        let rank = sites.first().map_or(1, |s| s.rank);
        let layout = Layout {
            backbone: backbone.kind.clone(),
            sites,
            rank,
            alpha: rank as f64,
            rslora: false,
            dropout: 0.0,
            dora: false,
            sets: default_sets(),
            ema: false,
        };
        let index = layout.site_index();
        Ok(Self {
            layout,
            index,
            online: BTreeMap::from([("default".to_string(), pairs)]),
            ema: BTreeMap::new(),
            ema_decay: default_decay(),
            spec: LoraSpec {
                rank,
                alpha: None,
                rslora: false,
                targets: None,
                blocks: None,
                component: None,
                init: LoraInit::Kaiming,
                dropout: 0.0,
                use_dora: false,
                sets: default_sets(),
                ema: false,
                ema_decay: default_decay(),
            },
            magnitudes_ready: true,
        })
    }

    /// The same adapter with every tensor on `device`.
    pub fn to_device(mut self, device: Device) -> Self {
        let mv = |m: &mut BTreeMap<String, Vec<Pair>>| {
            for pairs in m.values_mut() {
                for p in pairs.iter_mut() {
                    let rg = p.a.requires_grad();
                    let mv = |t: &Tensor| t.to_device(device).detach().set_requires_grad(rg);
                    p.a = mv(&p.a);
                    p.b = mv(&p.b);
                    p.m = p.m.as_ref().map(mv);
                }
            }
        };
        mv(&mut self.online);
        mv(&mut self.ema);
        self
    }

    /// Each site's weight delta s * B A [out, in] for `set` (online), by site name: what
    /// merging this adapter into the frozen weights adds (not DoRA, whose merge depends on W:
    /// see [`Lora::merge_into`]).
    pub fn weight_deltas(&self, set: &str) -> Result<Vec<(String, Tensor)>> {
        if self.layout.dora {
            return Err(Error::invalid(
                "lora: a DoRA adapter's merge depends on the frozen weights (merge_into)",
            ));
        }
        let sel = TokenSelection::online(set);
        let pairs = self.set_of(&sel)?;
        let _g = tch::no_grad_guard();
        Ok(self
            .layout
            .sites
            .iter()
            .zip(pairs)
            .map(|(s, p)| (s.site.name.clone(), p.b.matmul(&p.a) * s.scale))
            .collect())
    }

    /// Adds [`Lora::weight_deltas`] of `set` to `vs` (the backbone's weights, named as the
    /// sites are): the adapter merged.
    /// DoRA: W becomes m * (W + s B A) / ||W + s B A||_row.
    pub fn merge_into(&self, vs: &tch::nn::VarStore, set: &str) -> Result<()> {
        let vars = vs.variables();
        let sel = TokenSelection::online(set);
        let pairs = self.set_of(&sel)?;
        self.check_ready()?;
        let _g = tch::no_grad_guard();
        for (s, p) in self.layout.sites.iter().zip(pairs) {
            let key = format!("{}.weight", s.site.name);
            let mut w = vars
                .get(&key)
                .ok_or_else(|| Error::tensor(&key, "no such weight to merge into"))?
                .shallow_clone();
            let d = p.b.matmul(&p.a).to_device(w.device()) * s.scale;
            let mut merged = w.to_kind(Kind::Float) + d;
            if let Some(m) = &p.m {
                let norm = merged.linalg_norm(2.0, &[1i64][..], true, None::<Kind>);
                merged = &merged * m.to_device(w.device()).unsqueeze(1) / norm;
            }
            w.copy_(&merged.to_kind(w.kind()));
        }
        Ok(())
    }

    fn check_ready(&self) -> Result<()> {
        if self.magnitudes_ready {
            return Ok(());
        }
        Err(Error::invalid(
            "lora: the DoRA magnitudes were neither bound to the frozen weights nor restored \
             from a file (Adapter::bind_weights must run once the backbone is loaded)",
        ))
    }

    fn set_of<'a>(&'a self, sel: &'a TokenSelection) -> Result<&'a [Pair]> {
        let set = sel.set.as_deref().unwrap_or(&self.layout.sets[0]);
        self.pairs(set, sel.ema).ok_or_else(|| {
            Error::invalid(format!(
                "lora: no {}set `{set}` (sets: {})",
                if sel.ema { "EMA " } else { "" },
                self.layout.sets.join(", ")
            ))
        })
    }
}

/// Whether autograd is recording (dropout acts only then).
fn grad_enabled() -> bool {
    // SAFETY: plain calls into libtorch's thread-local grad mode; the second restores it.
    unsafe {
        let prev = torch_sys::at_grad_set_enabled(0);
        torch_sys::at_grad_set_enabled(prev);
        prev != 0
    }
}

/// The names of a pair's tensors in the adapter file, in `Pair::tensors` order.
fn names(set: &str, site: &str, p: &Pair) -> Vec<String> {
    let mut v = vec![
        format!("{set}.{site}.lora_A.weight"),
        format!("{set}.{site}.lora_B.weight"),
    ];
    if p.m.is_some() {
        v.push(format!("{set}.{site}.lora_magnitude_vector"));
    }
    v
}

impl Adapter for Lora {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn trainable(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for (set, pairs) in &self.online {
            for (s, p) in self.layout.sites.iter().zip(pairs) {
                for (n, t) in names(set, &s.site.name, p).into_iter().zip(p.tensors()) {
                    v.push((n, t.shallow_clone()));
                }
            }
        }
        v
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        let mut v = self.trainable();
        for (set, pairs) in &self.ema {
            for (s, p) in self.layout.sites.iter().zip(pairs) {
                for (n, t) in names(&format!("ema.{set}"), &s.site.name, p)
                    .into_iter()
                    .zip(p.tensors())
                {
                    v.push((n, t.shallow_clone()));
                }
            }
        }
        v
    }

    fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        crate::adapter::load_named_state(self.state(), tensors)?;
        self.magnitudes_ready = true;
        Ok(())
    }

    fn update_ema(&self, decay: f64) {
        let _guard = tch::no_grad_guard();
        for (set, ema) in &self.ema {
            for (e, o) in ema.iter().zip(&self.online[set]) {
                for (e, o) in e.tensors().zip(o.tensors()) {
                    let mut e = e.shallow_clone();
                    let _ = e.g_mul_scalar_(decay);
                    let _ = e.g_add_(&(o.detach() * (1.0 - decay)));
                }
            }
        }
    }

    fn has_ema(&self) -> bool {
        !self.ema.is_empty()
    }

    fn ema_decay(&self) -> Option<f64> {
        self.has_ema().then_some(self.ema_decay)
    }

    fn token_sets(&self) -> Vec<String> {
        self.layout.sets.clone()
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        let l = &self.layout;
        BTreeMap::from([
            ("adapter".into(), KIND.into()),
            ("backbone".into(), l.backbone.clone()),
            ("rank".into(), l.rank.to_string()),
            ("alpha".into(), l.alpha.to_string()),
            ("sites".into(), l.sites.len().to_string()),
            ("sets".into(), l.sets.join(",")),
            (
                "spec".into(),
                serde_json::to_string(&self.spec).expect("spec serialises"),
            ),
        ])
    }

    fn acts_on_linears(&self) -> bool {
        true
    }

    fn linear_delta(
        &self,
        site: &str,
        x: &Tensor,
        base: &LinearBase<'_>,
        sel: &TokenSelection,
    ) -> Result<Option<Tensor>> {
        let Some(&k) = self.index.get(site) else {
            return Ok(None);
        };
        let pair = &self.set_of(sel)?[k];
        let s = &self.layout.sites[k];
        let mut h = x.to_kind(Kind::Float);
        let dropped = self.layout.dropout > 0.0 && !sel.ema && grad_enabled();
        if dropped {
            h = h.dropout(self.layout.dropout, true);
        }
        let lora = h.matmul(&pair.a.tr()).matmul(&pair.b.tr());
        let Some(m) = &pair.m else {
            return Ok(Some((lora * s.scale).to_kind(x.kind())));
        };
        self.check_ready()?;
        // PEFT's DoraLinearLayer.forward: the row norm of W + s B A is a constant to autograd.
        let w = base.weight.detach().to_kind(Kind::Float);
        let norm = (&w + pair.b.matmul(&pair.a).detach() * s.scale).linalg_norm(
            2.0,
            &[1i64][..],
            false,
            None::<Kind>,
        );
        let mag_scale = m / norm;
        // The frozen layer's output without its bias, on the same (dropped-out) input.
        let frozen = if dropped {
            h.matmul(&w.tr())
        } else {
            let out = base.output.to_kind(Kind::Float);
            match base.bias {
                Some(b) => out - b.to_kind(Kind::Float),
                None => out,
            }
        };
        let d = (&mag_scale - 1.0) * frozen + &mag_scale * lora * s.scale;
        Ok(Some(d.to_kind(x.kind())))
    }

    fn bind_weights(&mut self, weights: &tch::nn::VarStore) -> Result<()> {
        if !self.layout.dora {
            return Ok(());
        }
        let vars = weights.variables();
        let _g = tch::no_grad_guard();
        for pairs in self.online.values().chain(self.ema.values()) {
            for (s, p) in self.layout.sites.iter().zip(pairs) {
                let key = format!("{}.weight", s.site.name);
                let w = vars
                    .get(&key)
                    .ok_or_else(|| Error::tensor(&key, "DoRA: no such frozen weight"))?;
                let norm =
                    w.to_kind(Kind::Float)
                        .linalg_norm(2.0, &[1i64][..], false, None::<Kind>);
                let mut m =
                    p.m.as_ref()
                        .expect("DoRA pairs hold a magnitude")
                        .shallow_clone();
                m.copy_(&norm.to_device(m.device()));
            }
        }
        self.magnitudes_ready = true;
        Ok(())
    }

    fn export(&self, dir: &Path) -> Result<()> {
        export::write_all(self, dir)
    }
}
