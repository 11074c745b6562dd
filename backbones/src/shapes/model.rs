//! `ShapesBackbone`: the shapes world's text-to-image denoiser. One VarStore holds both
//! sub-models under the pipeline's folder names (`text_encoder.text_model.*`,
//! `text_encoder.text_projection.weight`, `transformer.*` or `unet.*`), so full-parameter
//! training trains the text tower and the denoiser jointly.
//!
//! Conditioning is `input_ids` (B, L). The forward encodes them with the CLIP tower and feeds
//! the denoiser `last_hidden_state` as `encoder_hidden_states` (and, for the MMDiT,
//! `text_projection(pooled)` as `pooled_projections`). The last layer (not SD3's penultimate)
//! because the tower is trained from scratch together with the denoiser: the penultimate would
//! leave its last layer training for the pooled vector only.
use std::collections::BTreeMap;
use std::path::Path;

use softalign_core::adapter::lora::merge::WeightTarget;
use softalign_core::backbone::{Backbone, BackboneInfo, Conditioning, NoiseProcess, Prediction};
use softalign_core::dtype::DType;
use softalign_core::site::SiteHook;
use softalign_core::tensors::{save_safetensors, write_atomic};
use softalign_core::{Error, Result};
use tch::nn::{Module, VarStore};
use tch::{Device, Kind, Tensor};

use super::config::{unet_betas, Denoiser, ShapesConfig, PIXEL_SHIFT_KEY, TRANSFORMER, UNET};
use crate::clip::{ClipTextTransformer, ClipTokenizer, InitMode, TextEncoder, TOWER_PREFIX};
use crate::schedulers::ddpm::{BetaConfig, DdpmNoise};
use crate::sd3::{FlowMatch, Sd3Backbone, Sd3Transformer2DModel};
use crate::unet::{UNet2DConditionModel, UNetBackbone};
use crate::weights::AllowList;

pub const KIND: &str = "shapes";
/// The one conditioning tensor the forward takes.
pub const INPUT_IDS: &str = "input_ids";
pub const TEXT_ENCODER: &str = "text_encoder";
pub const TOKENIZER_FILE: &str = "tokenizer/tokenizer.json";
/// `model_index.json`'s class name for this pipeline (no diffusers class runs it as a whole;
/// each sub-folder loads with its own diffusers / transformers class).
pub const PIPELINE_CLASS: &str = "SoftalignShapesPipeline";

pub fn prediction(cfg: &ShapesConfig) -> Prediction {
    match cfg.denoiser {
        Denoiser::Transformer(_) => Prediction::Velocity,
        Denoiser::Unet(_) => Prediction::Epsilon,
    }
}

pub fn info(cfg: &ShapesConfig) -> Result<BackboneInfo> {
    let sites = match &cfg.denoiser {
        Denoiser::Transformer(t) => crate::sd3::transformer::sites(t),
        Denoiser::Unet(u) => crate::unet::unet_2d_condition::sites(u)?,
    };
    use softalign_core::linear_site::sites_of;
    // The denoiser first (a LoRA's default component), then the text tower, which runs
    // inside this backbone's forward and so can carry LoRA too.
    let mut linear_sites = match &cfg.denoiser {
        Denoiser::Transformer(t) => sites_of(
            TRANSFORMER,
            &format!("{TRANSFORMER}."),
            &crate::sd3::transformer::linear_shapes(t),
        ),
        Denoiser::Unet(u) => sites_of(
            UNET,
            &format!("{UNET}."),
            &crate::unet::unet_2d_condition::linear_shapes(u)?,
        ),
    };
    linear_sites.extend(sites_of(
        TEXT_ENCODER,
        &format!("{TEXT_ENCODER}."),
        &crate::clip::linear_shapes(&cfg.text_encoder, true),
    ));
    Ok(BackboneInfo {
        kind: KIND.into(),
        prediction: prediction(cfg),
        sites,
        linear_sites,
        conditioning: vec![INPUT_IDS.to_string()],
    })
}

/// The training noise: rectified flow for the MMDiT, DDPM for the UNet.
#[derive(Debug)]
pub enum ShapesNoise {
    Flow(FlowMatch),
    Ddpm(DdpmNoise),
}

impl ShapesNoise {
    fn get(&self) -> &dyn NoiseProcess {
        match self {
            Self::Flow(f) => f,
            Self::Ddpm(d) => d,
        }
    }
}

impl NoiseProcess for ShapesNoise {
    fn add_noise(&self, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Tensor {
        self.get().add_noise(x0, eps, t)
    }
    fn target(&self, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Tensor {
        self.get().target(x0, eps, t)
    }
    fn predicted_x0(&self, x_t: &Tensor, pred: &Tensor, t: &Tensor) -> Tensor {
        self.get().predicted_x0(x_t, pred, t)
    }
    fn sample_timesteps(&self, n: i64, device: Device) -> Tensor {
        self.get().sample_timesteps(n, device)
    }
}

enum DenoiserModel {
    Transformer(Box<Sd3Transformer2DModel>),
    Unet(Box<UNet2DConditionModel>),
}

pub struct ShapesBackbone {
    info: BackboneInfo,
    config: ShapesConfig,
    vs: VarStore,
    text: ClipTextTransformer,
    text_projection: Option<crate::linear::SiteLinear>,
    denoiser: DenoiserModel,
    tokenizer: ClipTokenizer,
    noise: ShapesNoise,
}

impl std::fmt::Debug for ShapesBackbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShapesBackbone")
            .field("config", &self.config)
            .finish()
    }
}

/// Zeroes the variables under `prefixes`: DiT's initialisation (Peebles & Xie 2023, 3.2), every
/// block's adaLN modulation and the output layer start at zero, so each joint block starts as
/// the identity and the first prediction is 0.
fn dit_zero_init(vs: &VarStore, num_layers: i64) {
    let _guard = tch::no_grad_guard();
    let mut prefixes = vec![
        format!("{TRANSFORMER}.norm_out.linear."),
        format!("{TRANSFORMER}.proj_out."),
    ];
    for i in 0..num_layers {
        for n in ["norm1", "norm1_context"] {
            prefixes.push(format!("{TRANSFORMER}.transformer_blocks.{i}.{n}.linear."));
        }
    }
    for (name, mut t) in vs.variables() {
        if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            let _ = t.zero_();
        }
    }
}

/// `[backbone] ddpm` (or [`ShapesBackbone::reparameterize`]) on an MMDiT base.
pub(crate) fn ddpm_on_an_mmdit() -> Error {
    Error::Recipe(
        "backbone shapes: `ddpm` settings apply to a UNet base; this one is an MMDiT (rectified \
         flow)"
            .into(),
    )
}

/// The training noise of a denoiser: `flow` for an MMDiT; for a UNet the DDPM schedule and
/// prediction type of its folder's scheduler_config.json (or the preset's, [`unet_betas`] and
/// epsilon).
fn noise_for(cfg: &ShapesConfig, dir: Option<&Path>, flow: FlowMatch) -> Result<ShapesNoise> {
    match cfg.denoiser {
        Denoiser::Transformer(_) => Ok(ShapesNoise::Flow(flow)),
        Denoiser::Unet(_) => {
            let (betas, pred) = match dir {
                Some(d) if d.join("scheduler/scheduler_config.json").is_file() => {
                    crate::unet::spec::scheduler_settings(d)?
                }
                _ => (unet_betas(), None),
            };
            Ok(ShapesNoise::Ddpm(DdpmNoise::new(
                betas,
                pred.unwrap_or(Prediction::Epsilon),
            )?))
        }
    }
}

impl ShapesBackbone {
    fn build(
        cfg: &ShapesConfig,
        tokenizer: ClipTokenizer,
        device: Device,
        noise: ShapesNoise,
        init: InitMode,
    ) -> Result<Self> {
        cfg.validate()?;
        if tokenizer.vocab_size() as i64 > cfg.text_encoder.vocab_size {
            return Err(Error::invalid(format!(
                "the tokenizer has {} tokens, the text encoder's vocab_size is {}",
                tokenizer.vocab_size(),
                cfg.text_encoder.vocab_size
            )));
        }
        let vs = VarStore::new(device);
        let root = vs.root();
        let te = &root / TEXT_ENCODER;
        let text = ClipTextTransformer::new(&te / TOWER_PREFIX, &cfg.text_encoder, init)?;
        let width = cfg.text_encoder.hidden_size;
        // transformers' init for text_projection: normal(std = hidden_size^-0.5), no bias.
        let std = (width as f64).powf(-0.5);
        let text_projection = cfg.text_encoder.projection_dim.map(|proj| {
            crate::clip::model::linear(&te / "text_projection", width, proj, false, std, init)
        });
        let denoiser = match &cfg.denoiser {
            Denoiser::Transformer(t) => DenoiserModel::Transformer(Box::new(
                Sd3Transformer2DModel::new(&root / TRANSFORMER, t)?,
            )),
            Denoiser::Unet(u) => {
                DenoiserModel::Unet(Box::new(UNet2DConditionModel::new(&root / UNET, u)?))
            }
        };
        let mut info = info(cfg)?;
        if let ShapesNoise::Ddpm(d) = &noise {
            info.prediction = d.prediction;
        }
        Ok(Self {
            info,
            config: cfg.clone(),
            vs,
            text,
            text_projection,
            denoiser,
            tokenizer,
            noise,
        })
    }

    /// A freshly initialised model in `dtype` (seed with `tch::manual_seed`): transformers'
    /// CLIP init; PyTorch's default layer init for the denoiser, with DiT's zero init of the
    /// modulations and the output layer for the MMDiT. `flow` is an MMDiT's training noise (a
    /// UNet trains with [`unet_betas`]).
    pub fn random(
        cfg: &ShapesConfig,
        device: Device,
        dtype: DType,
        flow: FlowMatch,
    ) -> Result<Self> {
        let tokenizer = super::config::world_tokenizer(cfg.max_length())?;
        let noise = noise_for(cfg, None, flow)?;
        let mut b = Self::build(cfg, tokenizer, device, noise, InitMode::Random)?;
        if let Denoiser::Transformer(t) = &cfg.denoiser {
            dit_zero_init(&b.vs, t.num_layers);
        }
        b.vs.set_kind(dtype.kind());
        b.vs.freeze();
        Ok(b)
    }

    /// Loads a pipeline folder written by [`Backbone::save_pretrained`]: each sub-model strictly
    /// (every tensor used, every variable filled) with its own loader, then moved into the one
    /// VarStore. `flow` is an MMDiT's training noise; a UNet's comes from the folder's
    /// scheduler_config.json.
    pub fn load(dir: &Path, device: Device, dtype: DType, flow: FlowMatch) -> Result<Self> {
        let index = dir.join("model_index.json");
        if !index.is_file() {
            return Err(Error::file(
                dir,
                "no model_index.json: not a shapes pipeline folder (text_encoder/, transformer/ \
                 or unet/, tokenizer/)",
            ));
        }
        let cfg = ShapesConfig::from_dir(dir)?;
        let tokenizer = ClipTokenizer::from_file(dir.join(TOKENIZER_FILE), cfg.max_length())?;
        let te = TextEncoder::load(dir.join(TEXT_ENCODER), Device::Cpu, Kind::Float)?;
        if te.with_projection() != cfg.text_encoder.projection_dim.is_some() {
            return Err(Error::file(
                dir.join(TEXT_ENCODER),
                "text_projection.weight and the config's projection_dim disagree",
            ));
        }
        if matches!(cfg.denoiser, Denoiser::Transformer(_)) && !te.with_projection() {
            return Err(Error::file(
                dir.join(TEXT_ENCODER),
                "no text_projection.weight: the shapes MMDiT pools through the projection \
                 (CLIPTextModelWithProjection)",
            ));
        }
        let noise = noise_for(&cfg, Some(dir), flow.clone())?;
        let sub = dir.join(cfg.denoiser.folder());
        let den_vars = match &cfg.denoiser {
            Denoiser::Transformer(_) => {
                let tr =
                    Sd3Backbone::load(&sub, Device::Cpu, DType::F32, &AllowList::default(), flow)?;
                tr.var_store().variables()
            }
            Denoiser::Unet(_) => {
                // The loader only fills weights: the model's noise is `noise` above, read once.
                let ddpm = DdpmNoise::new(unet_betas(), Prediction::Epsilon)?;
                let un =
                    UNetBackbone::load(&sub, Device::Cpu, DType::F32, &AllowList::default(), ddpm)?;
                un.var_store().variables()
            }
        };
        let mut sources: BTreeMap<String, Tensor> = BTreeMap::new();
        for (n, t) in te.named_tensors() {
            sources.insert(format!("{TEXT_ENCODER}.{n}"), t);
        }
        for (n, t) in den_vars {
            sources.insert(format!("{}.{n}", cfg.denoiser.folder()), t);
        }
        let mut b = Self::build(&cfg, tokenizer, device, noise, InitMode::Placeholder)?;
        let vars = b.vs.variables();
        // Both loaders were strict against the same module structure, so the names agree; a
        // mismatch here is a bug, reported rather than half-loaded.
        if vars.len() != sources.len() || vars.keys().any(|k| !sources.contains_key(k)) {
            let missing: Vec<&String> = vars.keys().filter(|k| !sources.contains_key(*k)).collect();
            return Err(Error::invalid(format!(
                "{}: {} variables, {} loaded tensors (unfilled: {missing:?})",
                dir.display(),
                vars.len(),
                sources.len()
            )));
        }
        {
            let _guard = tch::no_grad_guard();
            for (name, mut dst) in vars {
                dst.f_copy_(&sources[&name].to_device(device).to_kind(dst.kind()))
                    .map_err(|e| Error::tensor(&name, e))?;
            }
        }
        b.vs.set_kind(dtype.kind());
        b.vs.freeze();
        Ok(b)
    }

    pub fn config(&self) -> &ShapesConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// The MMDiT, when the denoiser is one.
    pub fn transformer(&self) -> Option<&Sd3Transformer2DModel> {
        match &self.denoiser {
            DenoiserModel::Transformer(t) => Some(&**t),
            DenoiserModel::Unet(_) => None,
        }
    }

    /// The UNet, when the denoiser is one.
    pub fn unet(&self) -> Option<&UNet2DConditionModel> {
        match &self.denoiser {
            DenoiserModel::Unet(u) => Some(&**u),
            DenoiserModel::Transformer(_) => None,
        }
    }

    /// The denoiser's text inputs for `input_ids`: (`encoder_hidden_states` (B, L, D), and
    /// `pooled_projections` (B, P) where the tower has a projection).
    pub fn encode_ids(&self, input_ids: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let out = self.text.forward(input_ids, None)?;
        let pooled = self
            .text_projection
            .as_ref()
            .map(|p| p.forward(&out.pooled));
        Ok((out.last_hidden_state, pooled))
    }

    fn sub_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter_map(|(n, t)| {
                n.strip_prefix(prefix)
                    .and_then(|r| r.strip_prefix('.'))
                    .map(|r| (r.to_string(), t))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn model_index(&self) -> serde_json::Value {
        let (te_class, den, den_class, sched) = match &self.config.denoiser {
            Denoiser::Transformer(_) => (
                "CLIPTextModelWithProjection",
                TRANSFORMER,
                crate::sd3::config::CLASS_NAME,
                "FlowMatchEulerDiscreteScheduler",
            ),
            Denoiser::Unet(_) => (
                "CLIPTextModel",
                UNET,
                crate::unet::config::CLASS_NAME,
                "DDIMScheduler",
            ),
        };
        let mut index = serde_json::json!({
            "_class_name": PIPELINE_CLASS,
            "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", sched],
            "text_encoder": ["transformers", te_class],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            den: ["diffusers", den_class],
        });
        if self.config.pixel_shift != 0.0 {
            index[PIXEL_SHIFT_KEY] = self.config.pixel_shift.into();
        }
        index
    }

    /// Trains (and saves) a UNet base under another DDPM parameterisation than its folder's:
    /// the prediction type and the zero-terminal-SNR rescale; the schedule's other settings
    /// stay. An MMDiT is refused (it trains with rectified flow).
    pub fn reparameterize(&mut self, prediction: Prediction, zero_snr: bool) -> Result<()> {
        let ShapesNoise::Ddpm(d) = &self.noise else {
            return Err(ddpm_on_an_mmdit());
        };
        let betas = BetaConfig {
            rescale_betas_zero_snr: zero_snr,
            ..d.betas.clone()
        };
        self.noise = ShapesNoise::Ddpm(DdpmNoise::new(betas, prediction)?);
        self.info.prediction = prediction;
        Ok(())
    }

    /// scheduler_config.json: what the model samples with by default.
    fn scheduler_config(&self) -> serde_json::Value {
        match (&self.config.denoiser, &self.noise) {
            (Denoiser::Unet(_), ShapesNoise::Ddpm(d)) => {
                let b = &d.betas;
                let schedule = match b.beta_schedule {
                    crate::schedulers::ddpm::BetaSchedule::Linear => "linear",
                    crate::schedulers::ddpm::BetaSchedule::ScaledLinear => "scaled_linear",
                };
                // DDIM with trailing spacing (its first step starts at t = 999) and x0 clipped
                // to a range holding the shifted images ([-1 - shift, 1 - shift]).
                let range = 1.0 + self.config.pixel_shift.abs();
                serde_json::json!({
                    "_class_name": "DDIMScheduler",
                    "_diffusers_version": "0.42.1",
                    "num_train_timesteps": b.num_train_timesteps,
                    "beta_start": b.beta_start,
                    "beta_end": b.beta_end,
                    "beta_schedule": schedule,
                    "prediction_type": match d.prediction {
                        Prediction::VPrediction => "v_prediction",
                        _ => "epsilon",
                    },
                    "rescale_betas_zero_snr": b.rescale_betas_zero_snr,
                    "timestep_spacing": "trailing",
                    "steps_offset": 0,
                    "set_alpha_to_one": false,
                    "clip_sample": true,
                    "clip_sample_range": range,
                })
            }
            // The training noise is SD3's rectified flow; `shift` is what this model samples
            // with by default, as SD3's own scheduler config records its shift.
            _ => serde_json::json!({
                "_class_name": "FlowMatchEulerDiscreteScheduler",
                "_diffusers_version": "0.42.1",
                "num_train_timesteps": 1000,
                "shift": 1.0,
            }),
        }
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("json serialises");
    write_atomic(path, text.as_bytes())
}

impl Backbone for ShapesBackbone {
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
            let (ehs, pooled) = self.encode_ids(cond.get(INPUT_IDS)?)?;
            let hook = hook.map(|h| (h, self.info.sites.as_slice()));
            match &self.denoiser {
                DenoiserModel::Transformer(tr) => {
                    let pooled = pooled.ok_or_else(|| {
                        Error::invalid("the shapes MMDiT needs the text tower's projection")
                    })?;
                    tr.forward(x_t, t, &ehs, &pooled, hook)
                }
                DenoiserModel::Unet(u) => u.forward(x_t, t, &ehs, None, hook),
            }
        })
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// One var store, the components under their folder names.
    fn weight_targets(&self) -> Vec<WeightTarget<'_>> {
        let denoiser = match self.denoiser {
            DenoiserModel::Transformer(_) => TRANSFORMER,
            DenoiserModel::Unet(_) => UNET,
        };
        [denoiser, TEXT_ENCODER]
            .iter()
            .map(|c| WeightTarget {
                component: c.to_string(),
                vs: &self.vs,
                prefix: format!("{c}."),
            })
            .collect()
    }

    fn unet_layers_per_block(&self) -> Option<i64> {
        let u = self.unet()?;
        u.config().resolve().ok()?.layers_per_block.first().copied()
    }

    fn var_store_mut(&mut self) -> &mut VarStore {
        &mut self.vs
    }

    /// Prompts as `input_ids` (B, L), L = the text tower's positions. The unconditional
    /// prompt for classifier-free guidance is `""` (BOS, EOS, padding), which the
    /// pretraining's caption dropout teaches.
    fn encode_prompts(&self, prompts: &[String]) -> Result<Conditioning> {
        let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let ids = self.tokenizer.encode(&texts, self.device())?;
        Ok(Conditioning::new().with(INPUT_IDS, ids))
    }

    fn sample_shape(&self) -> Option<[i64; 3]> {
        Some(self.config.sample_shape())
    }

    /// Pixel space: the samples plus the pixel shift are the images, clamped to [-1, 1].
    fn decode(&self, samples: &Tensor) -> Result<Tensor> {
        let s = samples.size();
        if s.len() != 4 || s[1] != 3 {
            return Err(Error::tensor(
                "samples",
                format!("shape {s:?}, expected (B, 3, H, W) RGB pixels"),
            ));
        }
        Ok((samples.to_kind(Kind::Float) + self.config.pixel_shift).clamp(-1.0, 1.0))
    }

    /// Pixel space: the samples are the images minus the pixel shift.
    fn encode_images(&self, images: &Tensor) -> Result<Tensor> {
        let want = self.config.sample_shape();
        let s = images.size();
        if s.len() != 4 || s[1..] != want {
            return Err(Error::tensor(
                "images",
                format!(
                    "shape {s:?}, this model draws (B, {}, {}, {}) pixels: set the dataset's \
                     `resolution` to {}",
                    want[0], want[1], want[2], want[1]
                ),
            ));
        }
        Ok(images.to_kind(Kind::Float) - self.config.pixel_shift)
    }

    /// Captions become ids and images stay pixels: the tokenizer and the sample shape decide
    /// an encoding (the text tower runs inside `forward`, so its weights do not).
    fn encoder_fingerprint(&self) -> Result<serde_json::Value> {
        use sha2::{Digest, Sha256};
        let tok = self.tokenizer.to_json()?;
        Ok(serde_json::json!({
            "kind": KIND,
            "tokenizer_sha256": format!("{:x}", Sha256::digest(tok.as_bytes())),
            "max_length": self.tokenizer.max_length(),
            "sample_shape": self.config.sample_shape(),
            "pixel_shift": self.config.pixel_shift,
        }))
    }

    /// A diffusers-style pipeline folder: model_index.json, text_encoder/ (transformers
    /// CLIPTextModel(WithProjection)), transformer/ (diffusers SD3Transformer2DModel) or unet/
    /// (UNet2DConditionModel), tokenizer/tokenizer.json and scheduler/scheduler_config.json.
    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mkdir = |d: &Path| std::fs::create_dir_all(d).map_err(|e| Error::file(d, e));
        let den = self.config.denoiser.folder();
        let te_dir = dir.join(TEXT_ENCODER);
        let den_dir = dir.join(den);
        let tok_dir = dir.join("tokenizer");
        let sched_dir = dir.join("scheduler");
        for d in [&te_dir, &den_dir, &tok_dir, &sched_dir] {
            mkdir(d)?;
        }
        write_json(&dir.join("model_index.json"), &self.model_index())?;
        let with_projection = self.text_projection.is_some();
        write_json(
            &te_dir.join("config.json"),
            &self.config.text_encoder.to_json(with_projection),
        )?;
        save_safetensors(
            te_dir.join("model.safetensors"),
            &self.sub_tensors(TEXT_ENCODER),
            &meta,
        )?;
        let den_json = match &self.config.denoiser {
            Denoiser::Transformer(t) => t.to_json(),
            Denoiser::Unet(u) => u.to_json(),
        };
        write_json(&den_dir.join("config.json"), &den_json)?;
        save_safetensors(
            den_dir.join(format!("{}.safetensors", crate::sd3::spec::WEIGHTS_STEM)),
            &self.sub_tensors(den),
            &meta,
        )?;
        self.tokenizer.save(dir.join(TOKENIZER_FILE))?;
        write_json(
            &sched_dir.join("scheduler_config.json"),
            &self.scheduler_config(),
        )
    }
}
