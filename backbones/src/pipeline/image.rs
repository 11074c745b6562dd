//! The pipeline's VAE as the denoiser sees it: images in [-1, 1] to scaled latents and back,
//! with the folder's `scaling_factor` / `shift_factor`.
use softalign_core::{Error, Result};
use tch::{Device, Kind, Tensor};

use super::folder::{model_digest, PipelineFolder};
use crate::vae::{AutoencoderKl, VaeConfig};

pub struct ImageCodec {
    pub vae: AutoencoderKl,
}

/// The VAE's dtype: the pipeline's, except fp16 for a VAE whose config asks for
/// `force_upcast` (SD 1.5 / SDXL VAEs overflow fp16; diffusers upcasts them to fp32 to decode).
pub fn vae_kind(cfg: &VaeConfig, kind: Kind) -> Kind {
    if kind == Kind::Half && cfg.force_upcast {
        Kind::Float
    } else {
        kind
    }
}

/// Pixels per latent side: `2 ** (len(block_out_channels) - 1)`, as diffusers'
/// `vae_scale_factor`.
pub fn scale_factor(cfg: &VaeConfig) -> i64 {
    1 << (cfg.block_out_channels.len() as i64 - 1).max(0)
}

impl ImageCodec {
    pub fn load(f: &PipelineFolder, device: Device, kind: Kind) -> Result<Self> {
        let dir = f.require("vae")?;
        let cfg = VaeConfig::from_file(&dir.join("config.json"))?;
        let vae = AutoencoderKl::load(&dir, device, vae_kind(&cfg, kind))?;
        Ok(Self { vae })
    }

    fn prepare(&self, images: &Tensor) -> Tensor {
        let k = self.vae.vs().variables().values().next().map(|v| v.kind());
        images
            .to_device(self.vae.device())
            .to_kind(k.unwrap_or(Kind::Float))
    }

    /// A posterior sample (torch's global generator), scaled and shifted; f32.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self
            .vae
            .images_to_latents(&self.prepare(images), true)?
            .to_kind(Kind::Float))
    }

    /// The scaled posterior mean and standard deviation; f32.
    pub fn posterior(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let p = self.vae.encode(&self.prepare(images))?;
        let scale = self.vae.config().scaling_factor;
        Ok((
            self.vae.scale_latents(&p.mean).to_kind(Kind::Float),
            (&p.std * scale).to_kind(Kind::Float),
        ))
    }

    /// Scaled latents to RGB in [-1, 1]; f32.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let s = latents.size();
        let c = self.vae.config().latent_channels;
        if s.len() != 4 || s[1] != c {
            return Err(Error::tensor(
                "samples",
                format!("shape {s:?}, the VAE decodes (B, {c}, h, w)"),
            ));
        }
        Ok(self
            .vae
            .latents_to_images(&self.prepare(latents))?
            .to_kind(Kind::Float)
            .clamp(-1.0, 1.0))
    }

    pub fn fingerprint(f: &PipelineFolder) -> Result<serde_json::Value> {
        model_digest(&f.require("vae")?, "diffusion_pytorch_model")
    }
}
