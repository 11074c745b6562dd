//! The `unet` backbone plugin: a diffusers Stable Diffusion pipeline folder (or a bare UNet
//! folder), optionally with the UNet taken from another folder (how Diffusion-DPO releases its
//! SD1.5 and SDXL models), or a preset with random weights for benches and tests.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use softalign_core::adapter::lora::merge::WeightTarget;
use softalign_core::backbone::{Backbone, BackboneInfo, Conditioning, NoiseProcess, Prediction};
use softalign_core::dtype::DType;
use softalign_core::plugin::{BackboneSpec, BuildContext};
use softalign_core::site::SiteHook;
use softalign_core::tensors::{save_safetensors, write_atomic};
use softalign_core::{register_plugin, Error, Result};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use super::config::UNetConfig;
use super::unet_2d_condition::{sites, TextTime, UNet2DConditionModel};
use crate::model_folder::{locate, not_this_model, preset_for_missing, preset_note};
use crate::pipeline::{Flavour, LoadParts, PipelineFolder, PipelineParts};
use crate::schedulers::ddpm::{BetaConfig, BetaSchedule, DdpmNoise};
use crate::weights::{load_strict, named_variables, weight_files, AllowList};

pub const KIND: &str = "unet";
pub const WEIGHTS_STEM: &str = "diffusion_pytorch_model";
pub const ENCODER_HIDDEN_STATES: &str = "encoder_hidden_states";
pub const TEXT_EMBEDS: &str = "text_embeds";
pub const TIME_IDS: &str = "time_ids";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetSpec {
    /// A pipeline folder (with `unet/` and usually `scheduler/`) or a UNet folder
    /// (config.json + diffusion_pytorch_model*.safetensors, or .bin); or a Hugging Face hub id
    /// (`stable-diffusion-v1-5/stable-diffusion-v1-5`) found in the local hub cache.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// With a hub id in `path`: the branch, tag or commit in the local hub cache (default
    /// `main`).
    #[serde(default)]
    pub revision: Option<String>,
    /// A UNet folder whose weights replace the base's (a Diffusion-DPO release, a fine-tune);
    /// everything else, the noise schedule included, comes from `path`.
    #[serde(default)]
    pub unet: Option<PathBuf>,
    /// `sd15` or `sdxl` with random weights (benches, tests).
    #[serde(default)]
    pub preset: Option<String>,
    /// Storage precision of the weights (default f32).
    #[serde(default)]
    pub dtype: Option<DType>,
    /// `epsilon` or `v_prediction`; default: the pipeline's scheduler_config.json, else epsilon.
    #[serde(default)]
    pub prediction_type: Option<Prediction>,
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
    /// LoRA files merged into the weights at load, in order (any dialect):
    /// `loras = [{ path = "style.safetensors", scale = 0.8 }]`.
    #[serde(default)]
    pub loras: Vec<softalign_core::adapter::lora::merge::LoraRef>,
}

fn yes() -> bool {
    true
}

/// Noise schedule and prediction type from a pipeline's scheduler_config.json (the keys every
/// diffusers scheduler class shares; the rest of that file belongs to the sampler).
pub(crate) fn scheduler_settings(dir: &Path) -> Result<(BetaConfig, Option<Prediction>)> {
    let path = dir.join("scheduler").join("scheduler_config.json");
    if !path.is_file() {
        return Ok((BetaConfig::default(), None));
    }
    // The keys every scheduler class shares; the others belong to the sampler. A key of the
    // wrong type is an error naming it (never a silent default).
    #[derive(serde::Deserialize)]
    struct Shared {
        num_train_timesteps: Option<i64>,
        beta_start: Option<f64>,
        beta_end: Option<f64>,
        beta_schedule: Option<String>,
        rescale_betas_zero_snr: Option<bool>,
        prediction_type: Option<String>,
    }
    let v: Shared = softalign_core::json_file::read(&path)?;
    let mut betas = BetaConfig::default();
    if let Some(n) = v.num_train_timesteps {
        betas.num_train_timesteps = n;
    }
    if let Some(x) = v.beta_start {
        betas.beta_start = x;
    }
    if let Some(x) = v.beta_end {
        betas.beta_end = x;
    }
    match v.beta_schedule.as_deref() {
        None | Some("scaled_linear") => {}
        Some("linear") => betas.beta_schedule = BetaSchedule::Linear,
        Some(o) => {
            return Err(Error::file(
                &path,
                format!("`beta_schedule` = \"{o}\" is not supported (linear, scaled_linear)"),
            ))
        }
    }
    if let Some(b) = v.rescale_betas_zero_snr {
        betas.rescale_betas_zero_snr = b;
    }
    let pred = match v.prediction_type.as_deref() {
        None => None,
        Some("epsilon") => Some(Prediction::Epsilon),
        Some("v_prediction") => Some(Prediction::VPrediction),
        Some(o) => {
            return Err(Error::file(
                &path,
                format!("`prediction_type` = \"{o}\" is not supported (epsilon, v_prediction)"),
            ))
        }
    };
    if betas.rescale_betas_zero_snr && pred != Some(Prediction::VPrediction) {
        return Err(Error::file(
            &path,
            "`rescale_betas_zero_snr` = true needs `prediction_type` = \"v_prediction\": at the \
             last timestep there is no signal, and an epsilon model's x0 is undefined there",
        ));
    }
    Ok((betas, pred))
}

impl UNetSpec {
    pub fn from_path(path: impl Into<PathBuf>) -> Self {
        Self {
            path: Some(path.into()),
            revision: None,
            unet: None,
            preset: None,
            dtype: None,
            prediction_type: None,
            allow_missing: Vec::new(),
            allow_unused: Vec::new(),
            text_encoders: true,
            vae: true,
            loras: Vec::new(),
        }
    }

    /// The UNet folder `path` points at (`path/unet` in a pipeline folder).
    pub fn model_dir(path: &Path) -> PathBuf {
        let sub = path.join("unet");
        if sub.join("config.json").is_file() {
            sub
        } else {
            path.to_path_buf()
        }
    }

    /// Whether `path` holds a diffusers UNet (pipeline or UNet folder).
    pub fn is_unet_folder(path: &Path) -> bool {
        let cfg = Self::model_dir(path).join("config.json");
        std::fs::read_to_string(cfg)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("_class_name")?.as_str().map(str::to_string))
            .is_some_and(|c| c == super::config::CLASS_NAME)
    }

    /// Base config, base weights folder (None for a preset), noise schedule, prediction.
    fn source(&self, ctx: &BuildContext) -> Result<(UNetConfig, Option<PathBuf>, DdpmNoise)> {
        let (cfg, dir, betas, pred) = match (&self.path, &self.preset) {
            (Some(p), None) => {
                let root = locate(ctx, p, self.revision.as_deref())?;
                let dir = Self::model_dir(&root);
                if !dir.join("config.json").is_file() {
                    return Err(not_this_model(
                        &root,
                        KIND,
                        "a Stable Diffusion pipeline folder (unet/config.json) or a UNet folder \
                         (config.json)",
                    ));
                }
                let cfg = UNetConfig::from_file(&dir.join("config.json"))?;
                let (betas, pred) = scheduler_settings(&root)?;
                (cfg, Some(dir), betas, pred)
            }
            (None, Some(name)) => (UNetConfig::preset(name)?, None, BetaConfig::default(), None),
            _ => {
                return Err(Error::Recipe(
                    "backbone unet: give exactly one of `path` and `preset`".into(),
                ))
            }
        };
        let prediction = self.prediction_type.or(pred).unwrap_or(Prediction::Epsilon);
        if prediction == Prediction::Velocity {
            return Err(Error::Recipe(
                "backbone unet: `prediction_type` must be \"epsilon\" or \"v_prediction\"".into(),
            ));
        }
        let noise = DdpmNoise::new(betas, prediction)
            .map_err(|e| Error::Recipe(format!("backbone unet: {e}")))?;
        Ok((cfg, dir, noise))
    }

    fn dtype(&self, ctx: &BuildContext) -> DType {
        ctx.dtype_override.or(self.dtype).unwrap_or_default()
    }

    /// [`Self::source`] for recipe check: where the folder does not exist on this machine and
    /// its name is a released model's, that preset's shapes (saying so).
    fn source_for_check(&self, ctx: &BuildContext) -> Result<(UNetConfig, DdpmNoise)> {
        match self.source(ctx) {
            Ok((cfg, _, noise)) => Ok((cfg, noise)),
            Err(e) => {
                let root = self.path.as_ref().map(|p| ctx.resolve(p));
                let preset = root
                    .as_ref()
                    .filter(|r| !r.exists())
                    .and_then(|r| preset_for_missing(KIND, r).map(|p| (r, p)));
                let Some((root, name)) = preset else {
                    return Err(e);
                };
                eprintln!("{}", preset_note(KIND, root, name));
                let as_preset = Self {
                    path: None,
                    revision: None,
                    unet: None,
                    preset: Some(name.to_string()),
                    ..self.clone()
                };
                as_preset.source(ctx).map(|(cfg, _, noise)| (cfg, noise))
            }
        }
    }
}

register_plugin!(
    UNET_ENTRY,
    Backbone,
    "unet",
    "Stable Diffusion 1.x/2.x/SDXL UNet2DConditionModel (diffusers folder, optional UNet swap), DDPM noise",
    r#"[backbone]
type = "unet"
path = "models/stable-diffusion-v1-5"
unet = "models/dpo-sd1.5-text2image-v1/unet"   # optional: Diffusion-DPO UNet
dtype = "f16"
"#
);

#[typetag::serde(name = "unet")]
impl BackboneSpec for UNetSpec {
    fn describe(&self, ctx: &BuildContext) -> Result<BackboneInfo> {
        if self.unet.is_some() && self.preset.is_some() {
            return Err(Error::Recipe(
                "backbone unet: `unet` swaps the UNet of a `path` model, not of a preset".into(),
            ));
        }
        let (cfg, noise) = self.source_for_check(ctx)?;
        let root = self
            .path
            .as_ref()
            .and_then(|p| locate(ctx, p, self.revision.as_deref()).ok());
        if let Some(root) = root {
            if let Some(folder) = PipelineFolder::open(&root)? {
                let flavour = if cfg.has_text_time() {
                    Flavour::Sdxl
                } else {
                    Flavour::Sd15
                };
                PipelineParts::check_folder(&folder, flavour)?;
            }
        }
        info(&cfg, noise.prediction)
    }

    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Backbone>> {
        let (cfg, dir, noise) = self.source(ctx)?;
        let want = info(&cfg, noise.prediction)?;
        let dtype = self.dtype(ctx);
        let allow = AllowList {
            missing: self.allow_missing.clone(),
            unused: self.allow_unused.clone(),
        };
        let mut b = match (&self.unet, dir) {
            (Some(swap), Some(base)) => {
                let swap = Self::model_dir(&locate(ctx, swap, None)?);
                let b = UNetBackbone::load(&swap, ctx.device, dtype, &allow, noise)?;
                // Tokens and conditioning trained for the base must fit the swapped UNet.
                let got = b.info();
                if got.sites != want.sites || got.conditioning != want.conditioning {
                    return Err(Error::file(
                        &swap,
                        format!(
                            "does not fit the base model {} (cross-attention width, block groups \
                             or conditioning differ)",
                            base.display()
                        ),
                    ));
                }
                b
            }
            (Some(_), None) => {
                return Err(Error::Recipe(
                    "backbone unet: `unet` swaps the UNet of a `path` model, not of a preset"
                        .into(),
                ))
            }
            (None, Some(dir)) => UNetBackbone::load(&dir, ctx.device, dtype, &allow, noise)?,
            (None, None) => UNetBackbone::random(&cfg, ctx.device, dtype, noise)?,
        };
        if let Some(path) = &self.path {
            let root = locate(ctx, path, self.revision.as_deref())?;
            if let Some(folder) = PipelineFolder::open(&root)? {
                let flavour = if cfg.has_text_time() {
                    Flavour::Sdxl
                } else {
                    Flavour::Sd15
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
        }
        softalign_core::adapter::lora::merge::merge_all(&b, &self.loras, &ctx.recipe_dir)?;
        Ok(Box::new(b))
    }
}

pub fn conditioning(cfg: &UNetConfig) -> Vec<String> {
    let mut v = vec![ENCODER_HIDDEN_STATES.to_string()];
    if cfg.has_text_time() {
        v.push(TEXT_EMBEDS.into());
        v.push(TIME_IDS.into());
    }
    v
}

pub fn info(cfg: &UNetConfig, prediction: Prediction) -> Result<BackboneInfo> {
    Ok(BackboneInfo {
        kind: KIND.into(),
        prediction,
        sites: sites(cfg)?,
        linear_sites: softalign_core::linear_site::sites_of(
            "unet",
            "",
            &super::unet_2d_condition::linear_shapes(cfg)?,
        ),
        conditioning: conditioning(cfg),
    })
}

/// A loaded UNet: frozen weights (requires_grad off) in the chosen dtype.
pub struct UNetBackbone {
    info: BackboneInfo,
    vs: VarStore,
    model: UNet2DConditionModel,
    noise: DdpmNoise,
    /// Text encoders, VAE and fingerprint when built from a pipeline folder.
    pub pipeline: Option<PipelineParts>,
}

/// SDXL's `add_time_ids` for an image of `height` x `width` pixels as diffusers builds them by
/// default: original size, crop top-left (0, 0), target size, both sizes the image's.
pub fn sdxl_time_ids(batch: i64, height: i64, width: i64, device: Device) -> Tensor {
    let ids = [height, width, 0, 0, height, width].map(|v| v as f32);
    Tensor::from_slice(&ids)
        .view([1, 6])
        .expand([batch, 6], true)
        .to_device(device)
}

impl UNetBackbone {
    /// Builds the modules (random init) in `dtype` on `device`, frozen.
    pub fn random(
        cfg: &UNetConfig,
        device: Device,
        dtype: DType,
        noise: DdpmNoise,
    ) -> Result<Self> {
        let mut vs = VarStore::new(device);
        let model = UNet2DConditionModel::new(vs.root(), cfg)?;
        vs.set_kind(dtype.kind());
        vs.freeze();
        Ok(Self {
            info: info(cfg, noise.prediction)?,
            vs,
            model,
            noise,
            pipeline: None,
        })
    }

    /// Loads a UNet folder strictly (see [`load_strict`]).
    pub fn load(
        dir: &Path,
        device: Device,
        dtype: DType,
        allow: &AllowList,
        noise: DdpmNoise,
    ) -> Result<Self> {
        let cfg = UNetConfig::from_file(&dir.join("config.json"))?;
        let files = weight_files(dir, WEIGHTS_STEM)?;
        let b = Self::random(&cfg, device, dtype, noise)?;
        load_strict(&b.vs, &files, allow)?;
        Ok(b)
    }

    pub fn model(&self) -> &UNet2DConditionModel {
        &self.model
    }

    pub fn config(&self) -> &UNetConfig {
        self.model.config()
    }

    pub fn ddpm(&self) -> &DdpmNoise {
        &self.noise
    }

    /// Pixels per latent side: the pipeline VAE's, else Stable Diffusion's 8.
    pub fn vae_scale_factor(&self) -> i64 {
        self.pipeline.as_ref().map_or(8, |p| p.vae_scale_factor)
    }

    fn parts(&self) -> Result<&PipelineParts> {
        self.pipeline.as_ref().ok_or_else(|| {
            Error::invalid(
                "backbone `unet` was loaded without a pipeline folder (model_index.json): it \
                 has no text encoders or VAE (point `path` at the pipeline folder)",
            )
        })
    }
}

impl Backbone for UNetBackbone {
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
            let ehs = cond.get(ENCODER_HIDDEN_STATES)?;
            // Conditioning from a pipeline leaves the time ids out (they depend on the image
            // size, not the prompt): built from the sample's size, as diffusers does by default.
            let made;
            let text_time = if self.config().has_text_time() {
                let time_ids = match cond.0.get(TIME_IDS) {
                    Some(t) => t,
                    None if self.pipeline.is_some() => {
                        let s = x_t.size();
                        let f = self.vae_scale_factor();
                        made = sdxl_time_ids(s[0], s[2] * f, s[3] * f, x_t.device())
                            .to_kind(cond.get(TEXT_EMBEDS)?.kind());
                        &made
                    }
                    None => cond.get(TIME_IDS)?,
                };
                Some(TextTime {
                    text_embeds: cond.get(TEXT_EMBEDS)?,
                    time_ids,
                })
            } else {
                None
            };
            let hook = hook.map(|h| (h, self.info.sites.as_slice()));
            self.model.forward(x_t, t, ehs, text_time, hook)
        })
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut VarStore {
        &mut self.vs
    }

    fn sample_shape(&self) -> Option<[i64; 3]> {
        let c = self.config();
        c.sample_hw().map(|(h, w)| [c.in_channels, h, w])
    }

    crate::pipeline::delegate_to_pipeline!();

    fn weight_targets(&self) -> Vec<WeightTarget<'_>> {
        let mut v = vec![WeightTarget {
            component: "unet".into(),
            vs: &self.vs,
            prefix: String::new(),
        }];
        if let Some(text) = self.pipeline.as_ref().and_then(|p| p.text.as_ref()) {
            v.extend(text.weight_targets());
        }
        v
    }

    fn unet_layers_per_block(&self) -> Option<i64> {
        let r = self.config().resolve().ok()?;
        r.layers_per_block.first().copied()
    }

    /// The native sample times the pipeline VAE's scale factor.
    fn native_image_size(&self) -> Option<(i64, i64)> {
        let [_, h, w] = self.sample_shape()?;
        let f = self.pipeline.as_ref()?.vae_scale_factor;
        Some((h * f, w * f))
    }

    fn sample_shape_for(&self, height: i64, width: i64) -> Result<[i64; 3]> {
        self.parts()?.sample_shape_for(height, width)
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
