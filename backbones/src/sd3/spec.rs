//! The `sd3` backbone plugin: a diffusers SD3/SD3.5 transformer folder (or a pipeline folder
//! holding `transformer/`), or a preset with random weights for benches and tests.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use softalign_core::adapter::lora::merge::WeightTarget;
use softalign_core::backbone::{Backbone, BackboneInfo, Conditioning, NoiseProcess, Prediction};
use softalign_core::dtype::DType;
use softalign_core::plugin::{BackboneSpec, BuildContext};
use softalign_core::site::{SiteHook, TokenSpace};
use softalign_core::tensors::{save_safetensors, write_atomic};
use softalign_core::{register_plugin, Error, Result};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use super::config::Sd3Config;
use super::flow_match::{FlowMatch, TimestepSampling};
use super::transformer::{sites, Sd3Transformer2DModel};
use crate::model_folder::{locate, not_this_model, preset_for_missing, preset_note};
use crate::pipeline::{Flavour, LoadParts, PipelineFolder, PipelineParts};
use crate::vae::VaeConfig;
use crate::weights::{load_strict, named_variables, weight_files, AllowList};

pub const KIND: &str = "sd3";
pub const WEIGHTS_STEM: &str = "diffusion_pytorch_model";
pub const CONDITIONING: [&str; 2] = ["encoder_hidden_states", "pooled_projections"];
/// The compact stand-in for `encoder_hidden_states` (see `compact_conditioning`).
pub const CONTEXT_EMBEDS: &str = "context_embeds";

fn default_shift() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_t5_length() -> usize {
    crate::t5::tokenizer::DEFAULT_MAX_LENGTH
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sd3Spec {
    /// A transformer folder (config.json + diffusion_pytorch_model*.safetensors, or .bin) or a
    /// pipeline folder with a `transformer/` subfolder; or a Hugging Face hub id
    /// (`stabilityai/stable-diffusion-3-medium-diffusers`) found in the local hub cache.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// With a hub id: the branch, tag or commit in the local hub cache (default `main`).
    #[serde(default)]
    pub revision: Option<String>,
    /// `sd3-medium`, `sd3.5-medium` or `sd3.5-large` with random weights (benches, tests).
    #[serde(default)]
    pub preset: Option<String>,
    /// Storage precision of the weights (default f32).
    #[serde(default)]
    pub dtype: Option<DType>,
    /// Training timestep distribution (default: uniform_int, the reference).
    #[serde(default)]
    pub timesteps: TimestepSampling,
    /// Shift applied to the drawn sigma (1.0: none).
    #[serde(default = "default_shift")]
    pub timestep_shift: f64,
    /// Model tensors that may be absent from the checkpoint (exact names or `prefix*`).
    #[serde(default)]
    pub allow_missing: Vec<String>,
    /// Checkpoint tensors that may go unused (exact names or `prefix*`).
    #[serde(default)]
    pub allow_unused: Vec<String>,
    /// With a pipeline folder: load its text encoders and tokenizers (false: training from an
    /// encoding cache, which needs no prompts encoded).
    #[serde(default = "yes")]
    pub text_encoders: bool,
    /// With a pipeline folder: load its VAE (false: training from an encoding cache).
    #[serde(default = "yes")]
    pub vae: bool,
    /// T5 tokens of the conditioning (diffusers' `max_sequence_length`: 256; the SoftREPA
    /// reference used 512).
    #[serde(default = "default_t5_length")]
    pub t5_max_length: usize,
    /// LoRA files merged into the weights at load, in order (any dialect):
    /// `loras = [{ path = "style.safetensors", scale = 0.8 }]`.
    #[serde(default)]
    pub loras: Vec<softalign_core::adapter::lora::merge::LoraRef>,
}

impl Sd3Spec {
    pub fn from_path(path: impl Into<PathBuf>) -> Self {
        Self {
            path: Some(path.into()),
            revision: None,
            preset: None,
            dtype: None,
            timesteps: TimestepSampling::default(),
            timestep_shift: 1.0,
            allow_missing: Vec::new(),
            allow_unused: Vec::new(),
            text_encoders: true,
            vae: true,
            t5_max_length: default_t5_length(),
            loras: Vec::new(),
        }
    }

    /// The transformer folder `path` points at.
    pub fn model_dir(path: &Path) -> PathBuf {
        let sub = path.join("transformer");
        if sub.join("config.json").is_file() {
            sub
        } else {
            path.to_path_buf()
        }
    }

    fn source(&self, ctx: &BuildContext) -> Result<(Sd3Config, Option<PathBuf>)> {
        match (&self.path, &self.preset) {
            (Some(p), None) => {
                let root = locate(ctx, p, self.revision.as_deref())?;
                let dir = Self::model_dir(&root);
                if !dir.join("config.json").is_file() {
                    return Err(not_this_model(
                        &root,
                        KIND,
                        "an SD3 pipeline folder (transformer/config.json) or an SD3 transformer \
                         folder (config.json)",
                    ));
                }
                Ok((Sd3Config::from_file(&dir.join("config.json"))?, Some(dir)))
            }
            (None, Some(name)) => Ok((Sd3Config::preset(name)?, None)),
            _ => Err(Error::Recipe(
                "backbone sd3: give exactly one of `path` and `preset`".into(),
            )),
        }
    }

    /// The config recipe check reads: the folder's, or, where the folder does not exist on
    /// this machine and its name is a released model's, that preset's (saying so).
    fn config_for_check(&self, ctx: &BuildContext) -> Result<Sd3Config> {
        match self.source(ctx) {
            Ok((cfg, _)) => Ok(cfg),
            Err(e) => {
                let root = self.path.as_ref().map(|p| ctx.resolve(p));
                let preset = root
                    .as_ref()
                    .filter(|r| !r.exists())
                    .and_then(|r| preset_for_missing(KIND, r).map(|p| (r, p)));
                match preset {
                    Some((root, name)) => {
                        eprintln!("{}", preset_note(KIND, root, name));
                        Sd3Config::preset(name)
                    }
                    None => Err(e),
                }
            }
        }
    }

    /// The folder `path` names, where there is one (a hub id found in the cache included).
    fn root(&self, ctx: &BuildContext) -> Option<PathBuf> {
        let p = self.path.as_ref()?;
        locate(ctx, p, self.revision.as_deref()).ok()
    }

    /// Pixels per latent side: the pipeline VAE's, else SD3's 8.
    fn vae_scale_factor(&self, ctx: &BuildContext) -> Result<i64> {
        let Some(root) = self.root(ctx) else {
            return Ok(8);
        };
        let cfg = root.join("vae").join("config.json");
        if !cfg.is_file() {
            return Ok(8);
        }
        Ok(crate::pipeline::image::scale_factor(&VaeConfig::from_file(
            &cfg,
        )?))
    }

    fn dtype(&self, ctx: &BuildContext) -> DType {
        ctx.dtype_override.or(self.dtype).unwrap_or_default()
    }
}

register_plugin!(
    SD3_ENTRY,
    Backbone,
    "sd3",
    "Stable Diffusion 3 / 3.5 MMDiT (diffusers folder or preset), flow matching",
    r#"[backbone]
type = "sd3"
path = "models/stable-diffusion-3-medium-diffusers"
dtype = "bf16"
timesteps = { kind = "uniform_int" }
"#
);

#[typetag::serde(name = "sd3")]
impl BackboneSpec for Sd3Spec {
    fn describe(&self, ctx: &BuildContext) -> Result<BackboneInfo> {
        let cfg = self.config_for_check(ctx)?;
        FlowMatch::new(self.timesteps.clone(), self.timestep_shift)?;
        if let Some(root) = self.root(ctx) {
            if let Some(folder) = PipelineFolder::open(&root)? {
                let flavour = Flavour::Sd3 {
                    t5_length: self.t5_max_length,
                    joint_attention_dim: cfg.joint_attention_dim,
                };
                PipelineParts::check_folder(&folder, flavour)?;
            }
        }
        Ok(info(&cfg))
    }

    fn check_image_size(&self, ctx: &BuildContext, height: i64, width: i64) -> Result<()> {
        let cfg = self.config_for_check(ctx)?;
        check_pixels(&cfg, self.vae_scale_factor(ctx)?, height, width)
    }

    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Backbone>> {
        let (cfg, dir) = self.source(ctx)?;
        let noise = FlowMatch::new(self.timesteps.clone(), self.timestep_shift)?;
        let dtype = self.dtype(ctx);
        let b = match dir {
            Some(dir) => {
                let allow = AllowList {
                    missing: self.allow_missing.clone(),
                    unused: self.allow_unused.clone(),
                };
                let mut b = Sd3Backbone::load(&dir, ctx.device, dtype, &allow, noise)?;
                let root = locate(
                    ctx,
                    self.path.as_ref().expect("a folder source has a path"),
                    self.revision.as_deref(),
                )?;
                if let Some(folder) = PipelineFolder::open(&root)? {
                    if self.t5_max_length == 0 {
                        return Err(Error::Recipe(
                            "backbone sd3: `t5_max_length` must be at least 1".into(),
                        ));
                    }
                    let flavour = Flavour::Sd3 {
                        t5_length: self.t5_max_length,
                        joint_attention_dim: cfg.joint_attention_dim,
                    };
                    let parts = LoadParts {
                        text_encoders: self.text_encoders,
                        vae: self.vae,
                    };
                    b.pipeline = Some(PipelineParts::load(
                        &folder,
                        flavour,
                        parts,
                        ctx.device,
                        dtype.kind(),
                    )?);
                }
                b
            }
            None => Sd3Backbone::random(&cfg, ctx.device, dtype, noise)?,
        };
        softalign_core::adapter::lora::merge::merge_all(&b, &self.loras, &ctx.recipe_dir)?;
        Ok(Box::new(b))
    }
}

/// The image sizes an SD3 transformer denoises, in pixels: sides that are multiples of
/// patch_size latent pixels and span at most pos_embed_max_size patches.
pub fn check_pixels(cfg: &Sd3Config, vae_scale_factor: i64, height: i64, width: i64) -> Result<()> {
    let multiple = cfg.patch_size * vae_scale_factor;
    let max = cfg.pos_embed_max_size.map(|m| m * multiple);
    let fits = |side: i64| side > 0 && side % multiple == 0 && max.is_none_or(|m| side <= m);
    if fits(height) && fits(width) {
        return Ok(());
    }
    let limit = match max {
        Some(m) => format!(" and at most {m}"),
        None => String::new(),
    };
    Err(Error::invalid(format!(
        "image size {height}x{width}: height and width must be multiples of {multiple}{limit} \
         pixels for this model (patch_size {} x VAE scale factor {vae_scale_factor}{})",
        cfg.patch_size,
        match cfg.pos_embed_max_size {
            Some(p) => format!("; pos_embed_max_size {p} patches"),
            None => String::new(),
        }
    )))
}

pub fn info(cfg: &Sd3Config) -> BackboneInfo {
    BackboneInfo {
        kind: KIND.into(),
        prediction: Prediction::Velocity,
        sites: sites(cfg),
        linear_sites: softalign_core::linear_site::sites_of(
            "transformer",
            "",
            &super::transformer::linear_shapes(cfg),
        ),
        conditioning: CONDITIONING.iter().map(|s| s.to_string()).collect(),
    }
}

/// A loaded SD3 transformer: frozen weights (requires_grad off) in the chosen dtype.
pub struct Sd3Backbone {
    info: BackboneInfo,
    vs: VarStore,
    model: Sd3Transformer2DModel,
    noise: FlowMatch,
    /// Text encoders, VAE and fingerprint when built from a pipeline folder.
    pub pipeline: Option<PipelineParts>,
    /// Digest of the context_embedder as loaded (before any training-precision cast), which
    /// a compact encoding cache depends on.
    context_digest: String,
}

impl Sd3Backbone {
    /// Builds the modules (random init) in `dtype` on `device`, frozen.
    pub fn random(cfg: &Sd3Config, device: Device, dtype: DType, noise: FlowMatch) -> Result<Self> {
        let mut vs = VarStore::new(device);
        vs.set_kind(dtype.kind());
        let model = Sd3Transformer2DModel::new(vs.root(), cfg)?;
        // The positional table is created in fp32; bring it to the model dtype too.
        vs.set_kind(dtype.kind());
        vs.freeze();
        let context_digest = context_embedder_digest(&vs)?;
        Ok(Self {
            info: info(cfg),
            vs,
            model,
            noise,
            pipeline: None,
            context_digest,
        })
    }

    /// Loads a transformer folder strictly (see [`load_strict`]).
    pub fn load(
        dir: &Path,
        device: Device,
        dtype: DType,
        allow: &AllowList,
        noise: FlowMatch,
    ) -> Result<Self> {
        let cfg = Sd3Config::from_file(&dir.join("config.json"))?;
        let files = weight_files(dir, WEIGHTS_STEM)?;
        let mut b = Self::random(&cfg, device, dtype, noise)?;
        load_strict(&b.vs, &files, allow)?;
        b.context_digest = context_embedder_digest(&b.vs)?;
        Ok(b)
    }

    pub fn model(&self) -> &Sd3Transformer2DModel {
        &self.model
    }

    pub fn config(&self) -> &Sd3Config {
        self.model.config()
    }

    fn parts(&self) -> Result<&PipelineParts> {
        self.pipeline.as_ref().ok_or_else(|| {
            Error::invalid(
                "backbone `sd3` was loaded from a transformer folder without model_index.json: \
                 it has no text encoders or VAE (point `path` at the pipeline folder)",
            )
        })
    }
}

impl Backbone for Sd3Backbone {
    fn info(&self) -> &BackboneInfo {
        &self.info
    }

    fn noise(&self) -> &dyn NoiseProcess {
        &self.noise
    }

    fn forward(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        cond: &Conditioning,
        hook: Option<&dyn SiteHook>,
    ) -> Result<Tensor> {
        // Linear layers inside ask `hook` for their deltas (LoRA) through this scope.
        softalign_core::linear_site::with_hook(hook, || {
            let pooled = cond.get(CONDITIONING[1])?;
            let hook = hook.map(|h| (h, self.info.sites.as_slice()));
            // A compact encoding cache holds the context after the frozen context_embedder.
            if let Some(ctx) = cond.0.get(CONTEXT_EMBEDS) {
                return self.model.forward_embedded(x_t, t, ctx, pooled, hook);
            }
            let ehs = cond.get(CONDITIONING[0])?;
            self.model.forward(x_t, t, ehs, pooled, hook)
        })
    }

    /// The joint space is after the transformer's context_embedder (where the released SD3
    /// tokens live); the context space is the text encoders' output itself.
    fn prompt_tokens(&self, prompt: &str, space: TokenSpace) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let cond = self.encode_prompts(&[prompt.to_string()])?;
        let ehs = cond.get(CONDITIONING[0])?;
        Ok(match space {
            TokenSpace::Context => ehs.get(0),
            TokenSpace::Joint => self.model.embed_context(ehs).get(0),
        })
    }

    /// `encoder_hidden_states` (L x joint_attention_dim, 4096 for SD3) replaced by its
    /// `context_embedder` output (L x inner_dim, 1536 for SD3-medium): 2.7x fewer bytes.
    fn compact_conditioning(&self, cond: Conditioning) -> Result<Conditioning> {
        let _guard = tch::no_grad_guard();
        let mut map = cond.0;
        let ehs = map.remove(CONDITIONING[0]).ok_or_else(|| {
            Error::tensor(CONDITIONING[0], "missing from the conditioning to compact")
        })?;
        map.insert(CONTEXT_EMBEDS.into(), self.model.embed_context(&ehs));
        Ok(Conditioning(map))
    }

    /// The compact form depends on the transformer's own context_embedder.
    fn compact_fingerprint(&self) -> Result<serde_json::Value> {
        Ok(serde_json::json!({ "context_embedder_sha256": self.context_digest }))
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut VarStore {
        &mut self.vs
    }

    crate::pipeline::delegate_to_pipeline!();

    fn weight_targets(&self) -> Vec<WeightTarget<'_>> {
        let mut v = vec![WeightTarget {
            component: "transformer".into(),
            vs: &self.vs,
            prefix: String::new(),
        }];
        if let Some(text) = self.pipeline.as_ref().and_then(|p| p.text.as_ref()) {
            v.extend(text.weight_targets());
        }
        v
    }

    /// The transformer's `sample_size` (latent side of the released resolution).
    fn sample_shape(&self) -> Option<[i64; 3]> {
        let c = self.config();
        Some([c.in_channels, c.sample_size, c.sample_size])
    }

    /// The native sample times the pipeline VAE's scale factor.
    fn native_image_size(&self) -> Option<(i64, i64)> {
        let [_, h, w] = self.sample_shape()?;
        let f = self.pipeline.as_ref()?.vae_scale_factor;
        Some((h * f, w * f))
    }

    fn sample_shape_for(&self, height: i64, width: i64) -> Result<[i64; 3]> {
        let parts = self.parts()?;
        check_pixels(self.config(), parts.vae_scale_factor, height, width)?;
        parts.sample_shape_for(height, width)
    }

    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        let cfg = serde_json::to_string_pretty(&self.config().to_json()).expect("json");
        write_atomic(&dir.join("config.json"), cfg.as_bytes())?;
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        save_safetensors(
            dir.join(format!("{WEIGHTS_STEM}.safetensors")),
            &named_variables(&self.vs),
            &meta,
        )
    }
}

fn context_embedder_digest(vs: &VarStore) -> Result<String> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(n, _)| n.starts_with("context_embedder."))
        .collect();
    // variables() is a HashMap: fix the order so the digest is the same in every process.
    named.sort_by(|a, b| a.0.cmp(&b.0));
    softalign_core::tensors::digest(&named)
}
