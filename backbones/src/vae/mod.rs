//! diffusers' `AutoencoderKL` (models/autoencoders/autoencoder_kl.py, vae.py) with its weight
//! names: `encoder.*`, `quant_conv` and `post_quant_conv` when the config uses them (SD 1.5,
//! SDXL; not SD3), `decoder.*`. Encoding gives the diagonal Gaussian posterior; the scaling and
//! shift that map its samples to the denoiser's latents come from the folder's config.json.
pub mod blocks;
pub mod config;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use softalign_core::tensors::{save_safetensors, write_atomic};
use softalign_core::{Error, Result};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use blocks::{conv, group_norm, DownEncoderBlock2D, MidBlock, UpDecoderBlock2D};
pub use config::VaeConfig;

use crate::weights::{load_strict, weight_files, AllowList};

/// `Encoder`: conv_in, down blocks, mid block, norm, SiLU, conv_out to 2 x latent channels.
#[derive(Debug)]
pub struct Encoder {
    pub conv_in: nn::Conv2D,
    pub down_blocks: Vec<DownEncoderBlock2D>,
    pub mid_block: MidBlock,
    pub conv_norm_out: nn::GroupNorm,
    pub conv_out: nn::Conv2D,
}

impl Encoder {
    pub fn new(p: nn::Path, cfg: &VaeConfig) -> Self {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let n = ch.len();
        let down_blocks = (0..n)
            .map(|i| {
                let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
                DownEncoderBlock2D::new(
                    &p / "down_blocks" / i as i64,
                    c_in,
                    ch[i],
                    cfg.layers_per_block,
                    g,
                    i + 1 < n,
                )
            })
            .collect();
        let last = ch[n - 1];
        Self {
            conv_in: conv(&p / "conv_in", cfg.in_channels, ch[0], 3, 1, 1),
            down_blocks,
            mid_block: MidBlock::new(&p / "mid_block", last, g, cfg.mid_block_add_attention),
            conv_norm_out: group_norm(&p / "conv_norm_out", g, last),
            conv_out: conv(&p / "conv_out", last, 2 * cfg.latent_channels, 3, 1, 1),
        }
    }
}

impl Module for Encoder {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(xs);
        for b in &self.down_blocks {
            h = b.forward(&h);
        }
        let h = self.mid_block.forward(&h);
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// `Decoder`: conv_in, mid block, up blocks (widths reversed, `layers_per_block + 1` resnets
/// each), norm, SiLU, conv_out.
#[derive(Debug)]
pub struct Decoder {
    pub conv_in: nn::Conv2D,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpDecoderBlock2D>,
    pub conv_norm_out: nn::GroupNorm,
    pub conv_out: nn::Conv2D,
}

impl Decoder {
    pub fn new(p: nn::Path, cfg: &VaeConfig) -> Self {
        let rev: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let n = rev.len();
        let up_blocks = (0..n)
            .map(|i| {
                let c_in = if i == 0 { rev[0] } else { rev[i - 1] };
                UpDecoderBlock2D::new(
                    &p / "up_blocks" / i as i64,
                    c_in,
                    rev[i],
                    cfg.layers_per_block + 1,
                    g,
                    i + 1 < n,
                )
            })
            .collect();
        Self {
            conv_in: conv(&p / "conv_in", cfg.latent_channels, rev[0], 3, 1, 1),
            mid_block: MidBlock::new(&p / "mid_block", rev[0], g, cfg.mid_block_add_attention),
            up_blocks,
            conv_norm_out: group_norm(&p / "conv_norm_out", g, rev[n - 1]),
            conv_out: conv(&p / "conv_out", rev[n - 1], cfg.out_channels, 3, 1, 1),
        }
    }
}

impl Module for Decoder {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut h = self.mid_block.forward(&self.conv_in.forward(xs));
        for b in &self.up_blocks {
            h = b.forward(&h);
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// diffusers' `DiagonalGaussianDistribution` (log-variance clamped to [-30, 20]).
#[derive(Debug)]
pub struct Posterior {
    pub mean: Tensor,
    pub logvar: Tensor,
    pub std: Tensor,
}

impl Posterior {
    pub fn from_moments(moments: &Tensor) -> Self {
        let parts = moments.chunk(2, 1);
        let logvar = parts[1].clamp(-30.0, 20.0);
        let std = (&logvar * 0.5).exp();
        Self {
            mean: parts[0].shallow_clone(),
            logvar,
            std,
        }
    }

    /// `mean + std * noise`, with `noise` shaped as the mean.
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        if noise.size() != self.mean.size() {
            return Err(Error::tensor(
                "noise",
                format!(
                    "shape {:?}, the posterior has {:?}",
                    noise.size(),
                    self.mean.size()
                ),
            ));
        }
        Ok(&self.mean
            + &self.std
                * noise
                    .to_device(self.mean.device())
                    .to_kind(self.mean.kind()))
    }

    /// A sample drawn from torch's default generator, as diffusers' `sample(generator=None)`:
    /// after `tch::manual_seed(s)` it equals diffusers after `torch.manual_seed(s)` on CPU.
    pub fn sample(&self) -> Tensor {
        let noise = Tensor::randn(self.mean.size(), (self.mean.kind(), self.mean.device()));
        &self.mean + &self.std * noise
    }
}

/// `AutoencoderKL`.
pub struct AutoencoderKl {
    vs: nn::VarStore,
    config: VaeConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<nn::Conv2D>,
    pub post_quant_conv: Option<nn::Conv2D>,
}

impl std::fmt::Debug for AutoencoderKl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoencoderKl")
            .field("config", &self.config)
            .finish()
    }
}

impl AutoencoderKl {
    /// A model with PyTorch's default conv / linear init (seed with `tch::manual_seed`).
    pub fn new(config: &VaeConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let l2 = 2 * config.latent_channels;
        let l = config.latent_channels;
        Ok(Self {
            encoder: Encoder::new(&root / "encoder", config),
            decoder: Decoder::new(&root / "decoder", config),
            quant_conv: config
                .use_quant_conv
                .then(|| conv(&root / "quant_conv", l2, l2, 1, 1, 0)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| conv(&root / "post_quant_conv", l, l, 1, 1, 0)),
            config: config.clone(),
            vs,
        })
    }

    /// Loads a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors or its
    /// index, or the .bin pickle); every tensor must be used and every variable filled.
    pub fn load(dir: impl AsRef<Path>, device: Device, kind: Kind) -> Result<Self> {
        let dir = dir.as_ref();
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let files = weight_files(dir, "diffusion_pytorch_model")?;
        Self::load_files(&config, &files, device, kind)
    }

    pub fn load_files(
        config: &VaeConfig,
        files: &[PathBuf],
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let mut vae = Self::new(config, device)?;
        vae.vs.set_kind(kind);
        load_strict(&vae.vs, files, &AllowList::default()).map_err(|e| {
            // Checkpoints from diffusers < 0.14 name the attention `query/key/value/proj_attn`.
            let msg = e.to_string();
            if msg.contains(".query.") || msg.contains(".proj_attn.") {
                Error::invalid(format!(
                    "{msg} (legacy attention names: re-save the VAE with a current diffusers)"
                ))
            } else {
                e
            }
        })?;
        Ok(vae)
    }

    fn check_images(&self, images: &Tensor, name: &str, channels: i64) -> Result<Tensor> {
        let s = images.size();
        if s.len() != 4 || s[1] != channels {
            return Err(Error::tensor(
                name,
                format!("shape {s:?}, expected [B, {channels}, H, W]"),
            ));
        }
        let kind = self.encoder.conv_in.ws.kind();
        Ok(images.to_device(self.vs.device()).to_kind(kind))
    }

    /// Images [B, in_channels, H, W] in [-1, 1] (H, W multiples of the downsampling factor) to
    /// the posterior over unscaled latents.
    pub fn encode(&self, images: &Tensor) -> Result<Posterior> {
        let x = self.check_images(images, "sample", self.config.in_channels)?;
        let f = self.config.downsample_factor();
        let s = x.size();
        if s[2] % f != 0 || s[3] % f != 0 {
            return Err(Error::tensor(
                "sample",
                format!(
                    "height and width must be multiples of {f}, got {}x{}",
                    s[2], s[3]
                ),
            ));
        }
        let mut h = self.encoder.forward(&x);
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h);
        }
        Ok(Posterior::from_moments(&h))
    }

    /// Unscaled latents [B, latent_channels, h, w] to images (about [-1, 1]).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut z = self.check_images(latents, "latents", self.config.latent_channels)?;
        if let Some(q) = &self.post_quant_conv {
            z = q.forward(&z);
        }
        Ok(self.decoder.forward(&z))
    }

    /// The denoiser's latents from unscaled ones: `(z - shift_factor) * scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Tensor {
        (z - self.config.shift_factor.unwrap_or(0.0)) * self.config.scaling_factor
    }

    /// Inverse of [`Self::scale_latents`]: `z / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, latents: &Tensor) -> Tensor {
        latents / self.config.scaling_factor + self.config.shift_factor.unwrap_or(0.0)
    }

    /// Images in [-1, 1] to the denoiser's latents: a posterior sample (from torch's default
    /// generator, as the SoftREPA reference trains) or its mean, then scaled.
    pub fn images_to_latents(&self, images: &Tensor, sample: bool) -> Result<Tensor> {
        let post = self.encode(images)?;
        let z = if sample { post.sample() } else { post.mean };
        Ok(self.scale_latents(&z))
    }

    /// The denoiser's latents to images in [-1, 1] (clamped, as diffusers' image processor).
    pub fn latents_to_images(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self
            .decode(&self.unscale_latents(latents))?
            .clamp(-1.0, 1.0))
    }

    /// Writes config.json and diffusion_pytorch_model.safetensors with diffusers' names.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        let text = serde_json::to_string_pretty(&self.config.to_json()).expect("json");
        write_atomic(&dir.join("config.json"), text.as_bytes())?;
        let tensors = crate::weights::named_variables(&self.vs);
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        save_safetensors(
            dir.join("diffusion_pytorch_model.safetensors"),
            &tensors,
            &meta,
        )
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    pub fn vs(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }
}
