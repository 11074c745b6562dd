//! The denoiser a recipe trains adapters for. Concrete models live in `softalign-backbones`.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::site::{SiteHook, SiteInfo, TokenSpace};
use crate::{Error, Result};

/// What the network's output means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The added noise (DDPM epsilon).
    Epsilon,
    /// DDPM v = alpha_t eps - sigma_t x0.
    VPrediction,
    /// Flow-matching velocity eps - x0.
    Velocity,
}

/// How training noises x0 and what the network regresses to. Timesteps are per-sample float
/// tensors (B,) on the model's 0..1000 scale (SD3: sigma * 1000; DDPM: the integer step).
pub trait NoiseProcess: Send + Sync {
    fn add_noise(&self, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Tensor;
    fn target(&self, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Tensor;
    /// The clean sample the network's output implies at `x_t` (the inverse of `add_noise`
    /// given the prediction): epsilon `(x_t - sigma eps) / alpha`, v `alpha x_t - sigma v`,
    /// flow velocity `x_t - sigma v`. Differentiable in `pred`; `t` is (B,), broadcast over
    /// the trailing dimensions of `x_t` (which may carry extra leading axes after B only if
    /// the caller flattens them first).
    fn predicted_x0(&self, x_t: &Tensor, pred: &Tensor, t: &Tensor) -> Tensor;
    /// Draws `n` training timesteps with torch's global generator (seeded by the trainer).
    fn sample_timesteps(&self, n: i64, device: Device) -> Tensor;
}

/// Text conditioning, named as the backbone's forward arguments (`encoder_hidden_states`,
/// `pooled_projections`, ...), batch first.
#[derive(Debug, Default)]
pub struct Conditioning(pub BTreeMap<String, Tensor>);

impl Conditioning {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with(mut self, name: &str, t: Tensor) -> Self {
        self.0.insert(name.to_string(), t);
        self
    }
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.0.get(name).ok_or_else(|| {
            let have: Vec<&str> = self.0.keys().map(String::as_str).collect();
            Error::tensor(
                name,
                format!("missing from the conditioning (have: {})", have.join(", ")),
            )
        })
    }
    pub fn batch(&self) -> Result<i64> {
        let mut sizes = self
            .0
            .iter()
            .map(|(n, t)| (n, t.size().first().copied().unwrap_or(0)));
        let Some((_, b)) = sizes.next() else {
            return Err(Error::invalid("empty conditioning"));
        };
        for (n, s) in sizes {
            if s != b {
                return Err(Error::tensor(
                    n,
                    format!("batch {s} differs from the other conditioning tensors ({b})"),
                ));
            }
        }
        Ok(b)
    }
    /// Rows `idx` (an Int64 tensor) of every tensor.
    pub fn index_select(&self, idx: &Tensor) -> Conditioning {
        Conditioning(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.index_select(0, &idx.to_device(v.device()))))
                .collect(),
        )
    }
    pub fn to(&self, device: Device, kind: Kind) -> Conditioning {
        Conditioning(
            self.0
                .iter()
                .map(|(k, v)| {
                    let v = v.to_device(device);
                    let v = if v.is_floating_point() {
                        v.to_kind(kind)
                    } else {
                        v
                    };
                    (k.clone(), v)
                })
                .collect(),
        )
    }
    /// `self`'s rows then `other`'s, tensor by tensor (the two guidance branches in one
    /// forward); both must hold the same tensors.
    pub fn cat(&self, other: &Conditioning) -> Result<Conditioning> {
        let mut out = Conditioning::new();
        for (k, va) in &self.0 {
            let vb = other.0.get(k).ok_or_else(|| {
                Error::tensor(
                    k,
                    "present in the unconditional but not the conditional input",
                )
            })?;
            out = out.with(k, Tensor::cat(&[va, vb], 0));
        }
        if other.0.len() != self.0.len() {
            return Err(Error::invalid(
                "conditional and unconditional inputs hold different tensors",
            ));
        }
        Ok(out)
    }
    pub fn shallow_clone(&self) -> Conditioning {
        Conditioning(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone()))
                .collect(),
        )
    }
}

/// What a recipe can know about a backbone without loading weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackboneInfo {
    pub kind: String,
    pub prediction: Prediction,
    pub sites: Vec<SiteInfo>,
    /// Every Linear layer adapters may act at (LoRA), named by diffusers module path.
    #[serde(default)]
    pub linear_sites: Vec<crate::linear_site::LinearSite>,
    /// Names of the conditioning tensors the forward takes.
    pub conditioning: Vec<String>,
}

pub trait Backbone: Send {
    fn info(&self) -> &BackboneInfo;
    fn noise(&self) -> &dyn NoiseProcess;
    /// `x_t` (B, C, H, W), `t` (B,) float model timesteps; adapters act through `hook`.
    fn forward(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        cond: &Conditioning,
        hook: Option<&dyn SiteHook>,
    ) -> Result<Tensor>;
    /// The model's own weights, named as in the checkpoint. Frozen unless the trainer runs in
    /// full-parameter mode.
    fn var_store(&self) -> &tch::nn::VarStore;
    fn var_store_mut(&mut self) -> &mut tch::nn::VarStore;
    fn device(&self) -> Device {
        self.var_store().device()
    }
    /// Text to conditioning, for backbones that carry their own text encoders (the shapes
    /// world's model, full pipelines). Others take pre-encoded conditioning only.
    fn encode_prompts(&self, _prompts: &[String]) -> Result<Conditioning> {
        Err(Error::invalid(format!(
            "backbone `{}` has no text encoder: give it pre-encoded conditioning",
            self.info().kind
        )))
    }
    /// One prompt's text tokens (L, D) as a text-context site takes them in `space`: the
    /// `encoder_hidden_states` row of `encode_prompts` by default; a backbone with an input
    /// projection (SD3's context_embedder) passes them through it for the joint space.
    fn prompt_tokens(&self, prompt: &str, space: TokenSpace) -> Result<Tensor> {
        let _ = space;
        let cond = self.encode_prompts(&[prompt.to_string()])?;
        Ok(cond.get("encoder_hidden_states")?.get(0))
    }
    /// The unconditional branch of classifier-free guidance for one prompt: the encoded empty
    /// prompt, or what the pipeline uses instead (SDXL's `force_zeros_for_empty_prompt`: zeros).
    fn null_conditioning(&self) -> Result<Conditioning> {
        self.encode_prompts(&[String::new()])
    }
    /// RGB images (B, 3, H, W) in [-1, 1] to the clean samples the network denoises (a VAE
    /// encode, posterior sample, scaled and shifted by the folder's constants; the identity for
    /// pixel-space models). Draws from torch's global generator.
    fn encode_images(&self, _images: &Tensor) -> Result<Tensor> {
        Err(Error::invalid(format!(
            "backbone `{}` has no image encoder: give it pre-encoded latents",
            self.info().kind
        )))
    }
    /// The image posterior as the encoding cache stores it: the scaled latent mean and, for a
    /// VAE, the scaled standard deviation (a training sample is mean + std * noise). Pixel-space
    /// models return the images and no deviation.
    fn image_posterior(&self, images: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        Ok((self.encode_images(images)?, None))
    }
    /// What decides the output of `encode_images` / `encode_prompts` (encoder configs, weight
    /// digests, tokenizer, lengths): an encoding cache made with one fingerprint is refused by
    /// a backbone with another.
    fn encoder_fingerprint(&self) -> Result<serde_json::Value> {
        Err(Error::invalid(format!(
            "backbone `{}` has no encoders to cache",
            self.info().kind
        )))
    }
    /// The smallest form of `encode_prompts`' output the forward accepts, for encoding caches
    /// (SD3: the context after the frozen `context_embedder`). Default: unchanged.
    fn compact_conditioning(&self, cond: Conditioning) -> Result<Conditioning> {
        Ok(cond)
    }
    /// What, besides the encoders, decides `compact_conditioning` (weights of the denoiser it
    /// uses). Default: nothing.
    fn compact_fingerprint(&self) -> Result<serde_json::Value> {
        Ok(serde_json::Value::Null)
    }
    /// (C, H, W) of the sample the network denoises at its native resolution, where known.
    fn sample_shape(&self) -> Option<[i64; 3]> {
        None
    }
    /// (height, width) in pixels of the images the model makes at its native resolution,
    /// where it knows both its native sample and its image codec.
    fn native_image_size(&self) -> Option<(i64, i64)> {
        None
    }
    /// (C, h, w) of the sample for an image of `height` x `width` pixels, where the backbone
    /// knows its image codec.
    fn sample_shape_for(&self, height: i64, width: i64) -> Result<[i64; 3]> {
        Err(Error::invalid(format!(
            "backbone `{}` cannot size samples for {height}x{width} images",
            self.info().kind
        )))
    }
    /// Samples (B, C, H, W) to RGB images (B, 3, H', W') in [-1, 1] (a VAE decode; the identity
    /// for pixel-space models).
    fn decode(&self, _samples: &Tensor) -> Result<Tensor> {
        Err(Error::invalid(format!(
            "backbone `{}` has no decoder to images",
            self.info().kind
        )))
    }
    /// The weights LoRA files may name, per pipeline component (`transformer` / `unet` first,
    /// then `text_encoder`, `text_encoder_2`, ...): where merging writes.
    fn weight_targets(&self) -> Vec<crate::adapter::lora::merge::WeightTarget<'_>> {
        Vec::new()
    }
    /// The UNet's `layers_per_block`, which maps SDXL's SGM names in kohya files.
    fn unet_layers_per_block(&self) -> Option<i64> {
        None
    }
    /// Writes the weights as a diffusers-style folder (config.json + safetensors), where the
    /// backbone supports it (full-parameter training saves its result this way).
    fn save_pretrained(&self, _dir: &std::path::Path) -> Result<()> {
        Err(Error::invalid(format!(
            "backbone `{}` cannot save its weights",
            self.info().kind
        )))
    }
}
