//! SoftREPA's soft tokens: per site a (tokens, dim) block that a text-context site puts into
//! the context (prepended for MMDiT, after BOS for UNet cross-attention), an optional time
//! table added to the tokens, and several named sets (AGSM: `positive`, `negative`) with EMA
//! copies of their tokens.
//!
//! Tensor layout (also the saved file's): `{set}.tokens` (sites, tokens, dim), as the
//! reference's `dc_tokens`; `time_table` (buckets, sites * joint_dim), or (buckets, joint_dim)
//! when one row serves every site, as the reference's `dc_t_tokens`; `ema.{set}.tokens`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::adapter::prompt_init::{PromptPosition, PromptRowRequest};
use crate::adapter::{Adapter, TokenSelection};
use crate::backbone::BackboneInfo;
use crate::plugin::{AdapterSpec, BuildContext};
use crate::site::{ContextTokens, SiteInfo, SiteSelector, TokenSpace};
use crate::tensors::MappedSafetensors;
use crate::{register_plugin, Error, Result};

pub const KIND: &str = "soft_tokens";

/// How token rows start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenInit {
    /// N(0, std); the reference uses std 0.02.
    Normal {
        #[serde(default = "default_std")]
        std: f64,
    },
    Zeros,
    /// Every row copies a given embedding (e.g. the text encoder's BOS output for ""), plus
    /// N(0, noise_std) so rows can diverge (the reference's identical rows never do).
    Embedding {
        file: PathBuf,
        tensor: String,
        #[serde(default = "default_break_noise")]
        noise_std: f64,
    },
    /// Every row copies the backbone's encoding of the empty prompt at `position` (BOS), in
    /// the adapter's token space, plus N(0, noise_std): SoftREPA's init, computed from the
    /// loaded text encoders (no embedding file to make by hand).
    EmptyPrompt {
        #[serde(default)]
        position: PromptPosition,
        #[serde(default = "default_break_noise")]
        noise_std: f64,
    },
}

fn default_std() -> f64 {
    0.02
}
fn default_break_noise() -> f64 {
    1e-3
}
fn default_sets() -> Vec<String> {
    vec!["default".to_string()]
}
fn default_decay() -> f64 {
    0.9999
}

impl Default for TokenInit {
    fn default() -> Self {
        TokenInit::Normal { std: default_std() }
    }
}

/// How EMA copies start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EmaInit {
    /// A copy of the online tokens (the sane default).
    #[default]
    Copy,
    /// An independent draw from `init` (what the released AGSM code does).
    Independent,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftTokensSpec {
    /// Tokens per site.
    pub tokens: i64,
    pub sites: SiteSelector,
    /// Rows of the time table (0: none). Row = floor(t) // (1000 / buckets) on the 0..999 scale.
    #[serde(default)]
    pub time_buckets: i64,
    /// One time-table row shared by every site (the UNet reference) instead of one chunk per site.
    #[serde(default)]
    pub shared_time_row: bool,
    /// One block of tokens used at every selected site (the UNet reference: the same
    /// (n, D) tokens in every cross-attention of the active groups) instead of one per site.
    #[serde(default)]
    pub shared_tokens: bool,
    #[serde(default)]
    pub token_space: TokenSpace,
    #[serde(default)]
    pub init: TokenInit,
    /// Std of the time table's N(0, std) init (the reference: 0.02).
    #[serde(default = "default_std")]
    pub time_init_std: f64,
    /// Named token sets (AGSM: ["positive", "negative"]).
    #[serde(default = "default_sets")]
    pub sets: Vec<String>,
    /// Keep EMA copies of the tokens (AGSM reads predictions with them).
    #[serde(default)]
    pub ema: bool,
    #[serde(default = "default_decay")]
    pub ema_decay: f64,
    #[serde(default)]
    pub ema_init: EmaInit,
}

register_plugin!(
    SOFT_TOKENS_ENTRY,
    Adapter,
    "soft_tokens",
    "SoftREPA soft tokens per text-context site, optional time table, named sets with EMA",
    r#"[[adapter]]
type = "soft_tokens"
tokens = 4
sites = "joint_blocks[0..5]"
time_buckets = 100
token_space = "joint"
"#
);

#[typetag::serde(name = "soft_tokens")]
impl AdapterSpec for SoftTokensSpec {
    fn token_sets(&self) -> Vec<(String, bool)> {
        self.sets.iter().map(|s| (s.clone(), self.ema)).collect()
    }

    fn validate(&self, backbone: &BackboneInfo) -> Result<()> {
        self.layout(backbone).map(|_| ())
    }

    /// An `embedding` init's file is opened (header only) and its tensor's size checked, as
    /// building would.
    fn check_files(&self, backbone: &BackboneInfo, ctx: &BuildContext) -> Result<()> {
        let TokenInit::Embedding { file, tensor, .. } = &self.init else {
            return Ok(());
        };
        let layout = self.layout(backbone)?;
        let path = ctx.resolve(file);
        if !path.is_file() {
            return Err(Error::file(
                &path,
                "adapter soft_tokens: init embedding file not found",
            ));
        }
        let numel: i64 = MappedSafetensors::open(&path)?
            .shape(tensor)?
            .iter()
            .product();
        if numel != layout.token_dim {
            return Err(Error::file(
                &path,
                format!(
                    "tensor `{tensor}` has {numel} values, the tokens need {}",
                    layout.token_dim
                ),
            ));
        }
        Ok(())
    }

    fn empty_prompt_row(&self) -> Option<PromptRowRequest> {
        match &self.init {
            TokenInit::EmptyPrompt { position, .. } => Some(PromptRowRequest {
                space: self.token_space,
                position: *position,
            }),
            _ => None,
        }
    }

    fn build(&self, backbone: &BackboneInfo, ctx: &BuildContext) -> Result<Box<dyn Adapter>> {
        let layout = self.layout(backbone)?;
        Ok(Box::new(SoftTokens::init(self, layout, ctx)?))
    }

    /// Token blocks per set plus the time table.
    fn trainable_parameters(&self, backbone: &BackboneInfo) -> Result<Option<i64>> {
        let l = self.layout(backbone)?;
        let tokens = l.token_blocks() * l.tokens * l.token_dim * l.sets.len() as i64;
        let width = if l.shared_time_row {
            1
        } else {
            l.sites.len() as i64
        } * l.joint_dim;
        Ok(Some(tokens + l.buckets * width))
    }
}

/// Shapes resolved against a backbone.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub backbone: String,
    pub sites: Vec<SiteInfo>,
    pub tokens: i64,
    pub token_dim: i64,
    pub joint_dim: i64,
    pub space: TokenSpace,
    pub buckets: i64,
    pub shared_time_row: bool,
    pub shared_tokens: bool,
    pub sets: Vec<String>,
    pub ema: bool,
}

impl Layout {
    /// Token blocks stored: one per site, or one for all.
    pub fn token_blocks(&self) -> i64 {
        if self.shared_tokens {
            1
        } else {
            self.sites.len() as i64
        }
    }
}

impl SoftTokensSpec {
    pub fn layout(&self, backbone: &BackboneInfo) -> Result<Layout> {
        let field =
            |f: &str, msg: String| Error::Recipe(format!("adapter soft_tokens: `{f}` {msg}"));
        if self.tokens <= 0 {
            return Err(field(
                "tokens",
                format!("must be at least 1 (got {})", self.tokens),
            ));
        }
        if self.time_buckets < 0 || self.time_buckets > 1000 {
            return Err(field(
                "time_buckets",
                format!("must be in 0..=1000 (got {})", self.time_buckets),
            ));
        }
        if self.sets.is_empty() {
            return Err(field("sets", "must name at least one token set".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.sets {
            if s.is_empty() || s.contains('.') || !seen.insert(s) {
                return Err(field(
                    "sets",
                    format!("`{s}` is empty, contains '.', or repeats"),
                ));
            }
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(field(
                "ema_decay",
                format!("must be in [0, 1) (got {})", self.ema_decay),
            ));
        }
        match &self.init {
            TokenInit::Normal { std } if !(std.is_finite() && *std >= 0.0) => {
                return Err(field(
                    "init.std",
                    format!("must be a finite non-negative number (got {std})"),
                ))
            }
            TokenInit::Embedding { noise_std, .. } | TokenInit::EmptyPrompt { noise_std, .. }
                if !(noise_std.is_finite() && *noise_std >= 0.0) =>
            {
                return Err(field(
                    "init.noise_std",
                    format!("must be finite and non-negative (got {noise_std})"),
                ))
            }
            _ => {}
        }
        self.sites
            .check_syntax()
            .map_err(|e| field("sites", e.to_string()))?;
        let sites = self
            .sites
            .resolve(&backbone.sites)
            .map_err(|e| field("sites", e.to_string()))?;
        let dims = |f: &dyn Fn(&SiteInfo) -> Result<i64>| -> Result<i64> {
            let d: Vec<i64> = sites.iter().map(f).collect::<Result<_>>()?;
            if d.windows(2).any(|w| w[0] != w[1]) {
                return Err(field(
                    "sites",
                    "select sites of different widths; use one adapter per width".into(),
                ));
            }
            Ok(d[0])
        };
        let token_dim = dims(&|s| s.token_dim(self.token_space))
            .map_err(|e| field("token_space", e.to_string()))?;
        let joint_dim = dims(&|s| s.token_dim(TokenSpace::Joint))?;
        Ok(Layout {
            backbone: backbone.kind.clone(),
            sites,
            tokens: self.tokens,
            token_dim,
            joint_dim,
            space: self.token_space,
            buckets: self.time_buckets,
            shared_time_row: self.shared_time_row,
            shared_tokens: self.shared_tokens,
            sets: self.sets.clone(),
            ema: self.ema,
        })
    }
}

pub struct SoftTokens {
    layout: Layout,
    /// Online tokens per set (sites, tokens, dim), fp32, requires_grad.
    tokens: BTreeMap<String, Tensor>,
    ema: BTreeMap<String, Tensor>,
    ema_decay: f64,
    time_table: Option<Tensor>,
}

impl SoftTokens {
    fn init(spec: &SoftTokensSpec, layout: Layout, ctx: &BuildContext) -> Result<Self> {
        let dev = ctx.device;
        let shape = [layout.token_blocks(), layout.tokens, layout.token_dim];
        let draw = || -> Result<Tensor> {
            Ok(match &spec.init {
                TokenInit::Normal { std } => Tensor::randn(shape, (Kind::Float, dev)) * *std,
                TokenInit::Zeros => Tensor::zeros(shape, (Kind::Float, dev)),
                TokenInit::Embedding {
                    file,
                    tensor,
                    noise_std,
                } => {
                    let path = ctx.resolve(file);
                    let emb = MappedSafetensors::open(&path)?
                        .tensor(tensor)?
                        .to_kind(Kind::Float)
                        .flatten(0, -1);
                    if emb.size()[0] != layout.token_dim {
                        return Err(Error::file(
                            &path,
                            format!(
                                "tensor `{tensor}` has {} values, the tokens need {}",
                                emb.size()[0],
                                layout.token_dim
                            ),
                        ));
                    }
                    emb.to_device(dev).expand(shape, false)
                        + Tensor::randn(shape, (Kind::Float, dev)) * *noise_std
                }
                TokenInit::EmptyPrompt {
                    position,
                    noise_std,
                } => {
                    let req = PromptRowRequest {
                        space: layout.space,
                        position: *position,
                    };
                    let row = ctx.empty_prompt.get(req).ok_or_else(|| {
                        Error::invalid(
                            "adapter soft_tokens: init `empty_prompt` needs the backbone's \
                             encoding of \"\" (build the adapter from a recipe whose backbone \
                             loads its text encoders)",
                        )
                    })?;
                    if row.len() as i64 != layout.token_dim {
                        return Err(Error::invalid(format!(
                            "adapter soft_tokens: the empty prompt's row has {} values, the \
                             tokens need {}",
                            row.len(),
                            layout.token_dim
                        )));
                    }
                    Tensor::from_slice(row).to_device(dev).expand(shape, false)
                        + Tensor::randn(shape, (Kind::Float, dev)) * *noise_std
                }
            })
        };
        let mut tokens = BTreeMap::new();
        let mut ema = BTreeMap::new();
        for set in &layout.sets {
            let online = draw()?;
            if layout.ema {
                let copy = match spec.ema_init {
                    EmaInit::Copy => online.copy(),
                    EmaInit::Independent => draw()?,
                };
                ema.insert(set.clone(), copy);
            }
            tokens.insert(set.clone(), online.set_requires_grad(true));
        }
        let time_table = (layout.buckets > 0).then(|| {
            let width = if layout.shared_time_row {
                1
            } else {
                layout.sites.len() as i64
            } * layout.joint_dim;
            (Tensor::randn([layout.buckets, width], (Kind::Float, dev)) * spec.time_init_std)
                .set_requires_grad(true)
        });
        Ok(Self {
            layout,
            tokens,
            ema,
            ema_decay: spec.ema_decay,
            time_table,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Loads an adapter file written by [`crate::adapter::save_adapter`] for `backbone`. The file's
    /// sites, shapes and token space must fit the backbone; every tensor must be present.
    pub fn load(path: &Path, backbone: &BackboneInfo, device: Device) -> Result<Self> {
        let (file, spec): (_, SoftTokensSpec) =
            super::open_adapter_file(path, KIND, "soft tokens", backbone)?;
        let layout = spec
            .layout(backbone)
            .map_err(|e| Error::file(path, format!("does not fit the backbone: {e}")))?;
        let ctx = BuildContext {
            device,
            recipe_dir: PathBuf::from("."),
            dtype_override: None,
            empty_prompt: Default::default(),
        };
        // Shapes come from the layout; values from the file (init only fixes the shapes).
        let zero_spec = SoftTokensSpec {
            init: TokenInit::Zeros,
            ema_init: EmaInit::Copy,
            ..spec
        };
        let mut a = SoftTokens::init(&zero_spec, layout, &ctx)?;
        a.load_state(&file.all().map_err(|e| Error::file(path, e))?)
            .map_err(|e| Error::file(path, e))?;
        Ok(a)
    }

    fn bucket_rows(&self, t: &Tensor) -> Tensor {
        let b = self.layout.buckets;
        // floor(t) first, as the reference casts t to int before dividing.
        (t.to_kind(Kind::Double).floor() * b as f64 / 1000.0)
            .floor()
            .clamp(0.0, (b - 1) as f64)
            .to_kind(Kind::Int64)
    }
}

impl Adapter for SoftTokens {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn trainable(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .tokens
            .iter()
            .map(|(s, t)| (format!("{s}.tokens"), t.shallow_clone()))
            .collect();
        if let Some(tt) = &self.time_table {
            v.push(("time_table".into(), tt.shallow_clone()));
        }
        v
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        let mut v = self.trainable();
        v.extend(
            self.ema
                .iter()
                .map(|(s, t)| (format!("ema.{s}.tokens"), t.shallow_clone())),
        );
        v
    }

    fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        super::load_named_state(self.state(), tensors)
    }

    fn update_ema(&self, decay: f64) {
        let _guard = tch::no_grad_guard();
        for (set, e) in &self.ema {
            let mut e = e.shallow_clone();
            let online = &self.tokens[set];
            let _ = e.g_mul_scalar_(decay);
            let _ = e.g_add_(&(online.detach() * (1.0 - decay)));
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
        let sites: Vec<&str> = l.sites.iter().map(|s| s.name.as_str()).collect();
        let spec = SoftTokensSpec {
            tokens: l.tokens,
            sites: SiteSelector::Many(sites.iter().map(|s| s.to_string()).collect()),
            time_buckets: l.buckets,
            shared_time_row: l.shared_time_row,
            shared_tokens: l.shared_tokens,
            token_space: l.space,
            init: TokenInit::Zeros,
            time_init_std: 0.0,
            sets: l.sets.clone(),
            ema: l.ema,
            ema_decay: self.ema_decay,
            ema_init: EmaInit::Copy,
        };
        let space = match l.space {
            TokenSpace::Joint => "joint",
            TokenSpace::Context => "context",
        };
        BTreeMap::from([
            ("adapter".into(), KIND.into()),
            ("backbone".into(), l.backbone.clone()),
            (
                "sites".into(),
                serde_json::to_string(&sites).expect("strings serialise"),
            ),
            ("tokens".into(), l.tokens.to_string()),
            ("token_dim".into(), l.token_dim.to_string()),
            ("joint_dim".into(), l.joint_dim.to_string()),
            ("time_buckets".into(), l.buckets.to_string()),
            ("token_space".into(), space.into()),
            ("sets".into(), l.sets.join(",")),
            (
                "spec".into(),
                serde_json::to_string(&spec).expect("spec serialises"),
            ),
        ])
    }

    fn context_tokens(
        &self,
        site: &SiteInfo,
        t: &Tensor,
        batch: i64,
        sel: &TokenSelection,
    ) -> Result<Option<ContextTokens>> {
        let Some(k) = self.layout.sites.iter().position(|s| s.name == site.name) else {
            return Ok(None);
        };
        let set = sel.set.as_deref().unwrap_or(&self.layout.sets[0]);
        let table = if sel.ema { &self.ema } else { &self.tokens };
        let Some(all) = table.get(set) else {
            return Err(Error::invalid(format!(
                "soft tokens: no {}token set `{set}` (sets: {})",
                if sel.ema { "EMA " } else { "" },
                self.layout.sets.join(", ")
            )));
        };
        let block = if self.layout.shared_tokens { 0 } else { k };
        let tokens = all
            .get(block as i64)
            .unsqueeze(0)
            .expand([batch, self.layout.tokens, self.layout.token_dim], false);
        let offset = match &self.time_table {
            None => None,
            Some(tt) => {
                let t = t.to_device(tt.device());
                if t.size() != [batch] {
                    return Err(Error::tensor(
                        "timestep",
                        format!("shape {:?}, expected [{batch}]", t.size()),
                    ));
                }
                let rows = tt.index_select(0, &self.bucket_rows(&t));
                let jd = self.layout.joint_dim;
                let chunk = if self.layout.shared_time_row {
                    rows
                } else {
                    rows.narrow(1, k as i64 * jd, jd)
                };
                Some(chunk.unsqueeze(1))
            }
        };
        Ok(Some(ContextTokens {
            tokens,
            space: self.layout.space,
            offset,
        }))
    }
}
