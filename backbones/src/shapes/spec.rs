//! The `shapes` backbone plugin: the shapes world's pipeline folder, or a preset with random
//! weights (what `recipes/shapes/pretrain-*.toml` train from).
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use softalign_core::backbone::{Backbone, BackboneInfo, Prediction};
use softalign_core::dtype::DType;
use softalign_core::plugin::{BackboneSpec, BuildContext};
use softalign_core::{register_plugin, Error, Result};

use super::config::{Denoiser, ShapesConfig};
use super::model::{info, ShapesBackbone, KIND};
use crate::model_folder::{preset_for_missing, preset_note};
use crate::sd3::{FlowMatch, TimestepSampling};

fn default_shift() -> f64 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapesSpec {
    /// A pipeline folder (model_index.json, text_encoder/, transformer/, tokenizer/).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `tiny`, `mmdit` or `unet`: random weights in one of this project's own configs.
    #[serde(default)]
    pub preset: Option<String>,
    /// Storage precision of the weights (default f32).
    #[serde(default)]
    pub dtype: Option<DType>,
    /// Training timestep distribution (default: uniform_int, the SoftREPA reference).
    #[serde(default)]
    pub timesteps: TimestepSampling,
    /// Shift applied to the drawn sigma (1.0: none).
    #[serde(default = "default_shift")]
    pub timestep_shift: f64,
    /// LoRA files merged into the weights at load, in order (any dialect):
    /// `loras = [{ path = "style.safetensors", scale = 0.8 }]`.
    #[serde(default)]
    pub loras: Vec<softalign_core::adapter::lora::merge::LoraRef>,
    /// A UNet base's DDPM parameterisation, instead of its folder's scheduler config: to go
    /// on training a base under another one (`ddpm = { prediction_type = "v_prediction",
    /// rescale_betas_zero_snr = true }`); the saved folder records it.
    #[serde(default)]
    pub ddpm: Option<DdpmOverride>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdpmOverride {
    /// `epsilon` or `v_prediction`.
    pub prediction_type: String,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

impl DdpmOverride {
    fn prediction(&self) -> Result<Prediction> {
        let p = match self.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            o => {
                return Err(Error::Recipe(format!(
                    "backbone shapes: `ddpm.prediction_type` = \"{o}\" is not one of epsilon, \
                     v_prediction"
                )))
            }
        };
        if self.rescale_betas_zero_snr && p != Prediction::VPrediction {
            return Err(Error::Recipe(
                "backbone shapes: `ddpm.rescale_betas_zero_snr = true` needs `prediction_type = \
                 \"v_prediction\"` (an epsilon model's x0 is undefined at zero SNR)"
                    .into(),
            ));
        }
        Ok(p)
    }
}

impl ShapesSpec {
    pub fn from_path(path: impl Into<PathBuf>) -> Self {
        Self {
            path: Some(path.into()),
            preset: None,
            dtype: None,
            timesteps: TimestepSampling::default(),
            timestep_shift: 1.0,
            loras: Vec::new(),
            ddpm: None,
        }
    }

    pub fn preset(name: &str) -> Self {
        Self {
            path: None,
            preset: Some(name.into()),
            ..Self::from_path("")
        }
    }

    fn source(&self, ctx: &BuildContext) -> Result<(ShapesConfig, Option<PathBuf>)> {
        match (&self.path, &self.preset) {
            (Some(p), None) => {
                let dir = ctx.resolve(p);
                Ok((ShapesConfig::from_dir(&dir)?, Some(dir)))
            }
            (None, Some(name)) => Ok((ShapesConfig::preset(name)?, None)),
            _ => Err(Error::Recipe(
                "backbone shapes: give exactly one of `path` and `preset`".into(),
            )),
        }
    }

    /// The config `recipe check` validates against: the folder's, or for a missing folder
    /// that names a preset (a later training stage's input, `runs/shapes-mmdit/final-ema`,
    /// before the stage before it ran) that preset's, with a note.
    fn config_for_check(&self, ctx: &BuildContext) -> Result<ShapesConfig> {
        self.source(ctx).map(|(cfg, _)| cfg).or_else(|e| {
            let root = self.path.as_ref().map(|p| ctx.resolve(p));
            match root
                .filter(|r| !r.exists())
                .and_then(|r| preset_for_missing(KIND, &r).map(|name| (r, name)))
            {
                Some((root, name)) => {
                    eprintln!("{}", preset_note(KIND, &root, name));
                    ShapesConfig::preset(name)
                }
                None => Err(e),
            }
        })
    }

    /// The flow-matching noise an MMDiT trains with. A UNet draws its DDPM timesteps
    /// uniformly, so these settings must stay at their defaults for one.
    fn noise(&self, cfg: &ShapesConfig) -> Result<FlowMatch> {
        if matches!(cfg.denoiser, Denoiser::Unet(_))
            && (self.timesteps != TimestepSampling::UniformInt || self.timestep_shift != 1.0)
        {
            return Err(Error::Recipe(
                "backbone shapes: `timesteps` and `timestep_shift` are flow-matching settings; \
                 this model is a DDPM UNet, which draws t uniformly from 0..999"
                    .into(),
            ));
        }
        FlowMatch::new(self.timesteps.clone(), self.timestep_shift)
    }
}

register_plugin!(
    SHAPES_ENTRY,
    Backbone,
    "shapes",
    "The shapes world's pixel-space text-to-image model: CLIP text tower + SD3 MMDiT (flow matching) or UNet (DDPM)",
    r#"[backbone]
type = "shapes"
path = "assets/shapes-mmdit"
timesteps = { kind = "uniform_int" }
"#
);

#[typetag::serde(name = "shapes")]
impl BackboneSpec for ShapesSpec {
    fn describe(&self, ctx: &BuildContext) -> Result<BackboneInfo> {
        let cfg = self.config_for_check(ctx)?;
        self.noise(&cfg)?;
        let mut info = info(&cfg)?;
        if let Some(o) = &self.ddpm {
            if !matches!(cfg.denoiser, Denoiser::Unet(_)) {
                return Err(super::model::ddpm_on_an_mmdit());
            }
            info.prediction = o.prediction()?;
        } else if let (Some(p), Denoiser::Unet(_)) = (&self.path, &cfg.denoiser) {
            let dir = ctx.resolve(p);
            if let Ok((_, Some(pred))) = crate::unet::spec::scheduler_settings(&dir) {
                info.prediction = pred;
            }
        }
        Ok(info)
    }

    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Backbone>> {
        let (cfg, dir) = self.source(ctx)?;
        let noise = self.noise(&cfg)?;
        let dtype = ctx.dtype_override.or(self.dtype).unwrap_or_default();
        let mut b = match dir {
            Some(dir) => ShapesBackbone::load(&dir, ctx.device, dtype, noise)?,
            None => ShapesBackbone::random(&cfg, ctx.device, dtype, noise)?,
        };
        if let Some(o) = &self.ddpm {
            b.reparameterize(o.prediction()?, o.rescale_betas_zero_snr)?;
        }
        softalign_core::adapter::lora::merge::merge_all(&b, &self.loras, &ctx.recipe_dir)?;
        Ok(Box::new(b))
    }
}
