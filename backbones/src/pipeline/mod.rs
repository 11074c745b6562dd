//! Full diffusers pipeline folders behind the `sd3` and `unet` backbones: the text encoders,
//! tokenizers and VAE named by `model_index.json`, building conditioning exactly as diffusers'
//! `encode_prompt` does, latents as its VAE does, and a fingerprint for the encoding cache.
/// The `Backbone` methods a denoiser built from a pipeline folder hands to its
/// [`PipelineParts`] (text conditioning, VAE, fingerprint). Used inside `impl Backbone for X`,
/// where `X::parts(&self) -> Result<&PipelineParts>` says what is missing when there is none.
macro_rules! delegate_to_pipeline {
    () => {
        fn encode_prompts(&self, prompts: &[String]) -> Result<Conditioning> {
            self.parts()?.encode_prompts(prompts)
        }

        fn null_conditioning(&self) -> Result<Conditioning> {
            self.parts()?.null_conditioning()
        }

        fn encode_images(&self, images: &Tensor) -> Result<Tensor> {
            self.parts()?.encode_images(images)
        }

        fn image_posterior(&self, images: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
            self.parts()?.image_posterior(images)
        }

        fn encoder_fingerprint(&self) -> Result<serde_json::Value> {
            Ok(self.parts()?.fingerprint())
        }

        fn decode(&self, samples: &Tensor) -> Result<Tensor> {
            self.parts()?.decode(samples)
        }
    };
}
pub(crate) use delegate_to_pipeline;

pub mod content_digest;
pub mod estimate;
pub mod folder;
pub mod image;
pub mod text;

use softalign_core::backbone::Conditioning;
use softalign_core::{Error, Result};
use tch::{Device, Kind, Tensor};

pub use folder::PipelineFolder;
pub use image::ImageCodec;
pub use text::TextConditioner;

use crate::vae::VaeConfig;

/// Which parts of a pipeline folder to load (training from an encoding cache needs none).
#[derive(Debug, Clone, Copy)]
pub struct LoadParts {
    pub text_encoders: bool,
    pub vae: bool,
}

/// The conditioning style, from the denoiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Sd15,
    Sdxl,
    Sd3 {
        t5_length: usize,
        joint_attention_dim: i64,
    },
}

impl Flavour {
    fn name(&self) -> &'static str {
        match self {
            Self::Sd15 => "sd15",
            Self::Sdxl => "sdxl",
            Self::Sd3 { .. } => "sd3",
        }
    }
}

/// What a backbone built from a pipeline folder carries besides its denoiser.
pub struct PipelineParts {
    pub flavour: Flavour,
    pub text: Option<TextConditioner>,
    pub image: Option<ImageCodec>,
    /// Latent channels and pixels per latent side (from vae/config.json, loaded or not).
    pub latent_channels: i64,
    pub vae_scale_factor: i64,
    /// SDXL's `force_zeros_for_empty_prompt`: the unconditional branch is zeros.
    pub zeros_for_empty_prompt: bool,
    /// The denoiser's dtype: conditioning is handed over in it, as diffusers casts.
    pub kind: Kind,
    fingerprint: serde_json::Value,
}

impl PipelineParts {
    /// What [`PipelineParts::load`] would refuse about the folder's components (a listed
    /// component whose folder is missing, a text encoder without its tokenizer, the VAE's
    /// config), found without reading weights: `recipe check` runs it.
    pub fn check_folder(f: &PipelineFolder, flavour: Flavour) -> Result<()> {
        VaeConfig::from_file(&f.require("vae")?.join("config.json"))?;
        match flavour {
            Flavour::Sd15 => {
                f.require("text_encoder")?;
                f.require("tokenizer")?;
            }
            Flavour::Sdxl => {
                f.text_pair("text_encoder", "tokenizer")?;
                f.require("text_encoder_2")?;
                f.require("tokenizer_2")?;
            }
            Flavour::Sd3 { .. } => {
                for name in ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"] {
                    f.require(name)?;
                }
                f.text_pair("text_encoder_3", "tokenizer_3")?;
            }
        }
        Ok(())
    }

    pub fn load(
        f: &PipelineFolder,
        flavour: Flavour,
        parts: LoadParts,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let vae_dir = f.require("vae")?;
        let vae_cfg = VaeConfig::from_file(&vae_dir.join("config.json"))?;
        let text = if parts.text_encoders {
            Some(match flavour {
                Flavour::Sd15 => TextConditioner::load_sd15(f, device, kind)?,
                Flavour::Sdxl => TextConditioner::load_sdxl(f, device, kind)?,
                Flavour::Sd3 {
                    t5_length,
                    joint_attention_dim,
                } => TextConditioner::load_sd3(f, device, kind, t5_length, joint_attention_dim)?,
            })
        } else {
            None
        };
        let image = if parts.vae {
            Some(ImageCodec::load(f, device, kind)?)
        } else {
            None
        };
        let t5_length = match flavour {
            Flavour::Sd3 { t5_length, .. } => Some(t5_length),
            _ => None,
        };
        let fingerprint = serde_json::json!({
            "text": TextConditioner::fingerprint(f, flavour.name(), t5_length)?,
            "vae": ImageCodec::fingerprint(f)?,
            "text_kind": format!("{kind:?}"),
            "vae_kind": format!("{:?}", image::vae_kind(&vae_cfg, kind)),
        });
        Ok(Self {
            flavour,
            text,
            image,
            latent_channels: vae_cfg.latent_channels,
            vae_scale_factor: image::scale_factor(&vae_cfg),
            zeros_for_empty_prompt: flavour == Flavour::Sdxl
                && f.flag("force_zeros_for_empty_prompt")?.unwrap_or(true),
            kind,
            fingerprint,
        })
    }

    fn text(&self) -> Result<&TextConditioner> {
        self.text.as_ref().ok_or_else(|| {
            Error::invalid(
                "the backbone was built with `text_encoders = false`: prompts need the text \
                 encoders (train from an encoding cache, or set text_encoders = true)",
            )
        })
    }

    fn image(&self) -> Result<&ImageCodec> {
        self.image.as_ref().ok_or_else(|| {
            Error::invalid(
                "the backbone was built with `vae = false`: images need the VAE (train from an \
                 encoding cache, or set vae = true)",
            )
        })
    }

    pub fn encode_prompts(&self, prompts: &[String]) -> Result<Conditioning> {
        let cond = self.text()?.encode(prompts)?;
        Ok(Conditioning(
            cond.0
                .into_iter()
                .map(|(k, v)| (k, v.to_kind(self.kind)))
                .collect(),
        ))
    }

    /// The unconditional branch of classifier-free guidance: the encoded empty prompt, or
    /// zeros for SDXL's `force_zeros_for_empty_prompt`.
    pub fn null_conditioning(&self) -> Result<Conditioning> {
        let c = self.encode_prompts(&[String::new()])?;
        if !self.zeros_for_empty_prompt {
            return Ok(c);
        }
        Ok(Conditioning(
            c.0.into_iter().map(|(k, v)| (k, v.zeros_like())).collect(),
        ))
    }

    pub fn encode_images(&self, images: &Tensor) -> Result<Tensor> {
        self.image()?.encode(images)
    }

    pub fn image_posterior(&self, images: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let (m, s) = self.image()?.posterior(images)?;
        Ok((m, Some(s)))
    }

    pub fn decode(&self, samples: &Tensor) -> Result<Tensor> {
        self.image()?.decode(samples)
    }

    pub fn fingerprint(&self) -> serde_json::Value {
        self.fingerprint.clone()
    }

    /// (C, h, w) of the latents of an image of `height` x `width` pixels.
    pub fn sample_shape_for(&self, height: i64, width: i64) -> Result<[i64; 3]> {
        let f = self.vae_scale_factor;
        if height <= 0 || width <= 0 || height % f != 0 || width % f != 0 {
            return Err(Error::invalid(format!(
                "image size {height}x{width}: both sides must be positive multiples of {f} \
                 (the VAE's scale factor)"
            )));
        }
        Ok([self.latent_channels, height / f, width / f])
    }
}
