//! The shapes world's text-to-image models: a CLIP text tower and a denoiser in pixel space,
//! either an SD3 MMDiT (flow matching) or an SD1.5-style UNet2DConditionModel (DDPM epsilon).
//! Its config is the pair of sub-model configs, as a diffusers pipeline folder holds them
//! (`text_encoder/config.json`, and `transformer/config.json` or `unet/config.json`).
use std::path::Path;

use softalign_core::{Error, Result};

use crate::clip::{ClipTextConfig, ClipTokenizer};
use crate::schedulers::ddpm::{BetaConfig, BetaSchedule};
use crate::sd3::Sd3Config;
use crate::unet::config::{PerBlock, UNetConfig, CROSS_ATTN_DOWN, CROSS_ATTN_UP, DOWN, UP};

/// Token ids of the word-level vocabulary ([`ClipTokenizer::build_word_level`]).
pub const BOS_ID: i64 = 0;
pub const EOS_ID: i64 = 1;

/// Text positions of the presets: the longest caption of the world (four objects of four
/// kinds, "a photo of a red circle and ... and a purple diamond") is 18 words + BOS + EOS = 20
/// ids; 24 leaves room and keeps the model small. Checked by the tests.
pub const TINY_MAX_LENGTH: i64 = 24;

/// Sub-folder names of the two denoisers, as diffusers pipelines name them.
pub const TRANSFORMER: &str = "transformer";
pub const UNET: &str = "unet";

/// The denoising network of a shapes model.
#[derive(Debug, Clone, PartialEq)]
pub enum Denoiser {
    /// diffusers `SD3Transformer2DModel`: joint-block sites, flow matching.
    Transformer(Sd3Config),
    /// diffusers `UNet2DConditionModel`: `down` / `mid` / `up` sites, DDPM epsilon.
    Unet(Box<UNetConfig>),
}

impl Denoiser {
    /// The pipeline sub-folder that holds it.
    pub fn folder(&self) -> &'static str {
        match self {
            Self::Transformer(_) => TRANSFORMER,
            Self::Unet(_) => UNET,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShapesConfig {
    pub text_encoder: ClipTextConfig,
    pub denoiser: Denoiser,
    /// The pixel codec: the network denoises `image - pixel_shift` (RGB in [-1, 1]), as an SD3
    /// VAE's `shift_factor` centres its latents. 0 for the MMDiT; 1 for the UNet, whose white
    /// canvas then sits at 0 (see [`UNET_PIXEL_SHIFT`]). `model_index.json`'s
    /// `softalign_pixel_shift`, absent meaning 0.
    pub pixel_shift: f64,
}

/// `model_index.json`'s key for [`ShapesConfig::pixel_shift`].
pub const PIXEL_SHIFT_KEY: &str = "softalign_pixel_shift";

/// The UNet base's pixel shift. An epsilon-prediction model sampled from pure noise starts
/// from x0 estimates with the mean it learned at the top of the schedule, where its training
/// inputs still carried a trace of the image; with the world's white canvas (mean ~0.86 in
/// [-1, 1]) that start was grey and every later step kept it: after 250 and 500 pretraining
/// steps (scaled-linear and linear betas) our DDIM and diffusers' DDIMScheduler drew grey
/// noise, although the model restored forward-noised images well. Centring the canvas at 0
/// (what DDPM's zero-mean image data gives for free) removes that trap.
pub const UNET_PIXEL_SHIFT: f64 = 1.0;

/// The world's tokenizer: the word-level vocabulary of `softalign_worlds::shapes::vocabulary()`,
/// padded and truncated to `max_length` ids.
pub fn world_tokenizer(max_length: usize) -> Result<ClipTokenizer> {
    ClipTokenizer::build_word_level(&softalign_worlds::shapes::vocabulary(), max_length)
}

/// The DDPM schedule of the shapes UNet: Stable Diffusion 1.5's (scaled-linear betas
/// 0.00085..0.012 over 1000 steps). DDPM's linear 1e-4..0.02 was tried first: its terminal
/// signal (abar_999 = 4e-5) leaves an epsilon model's x0 estimate at the top of the schedule
/// amplified 158-fold, and after 500 steps of pretraining the samples (ours and diffusers'
/// DDIMScheduler on the same weights) were grey noise although the denoiser already restored
/// noised images at t <= 400; SD's schedule (abar_999 = 0.0047) keeps that gain at 15.
pub fn unet_betas() -> BetaConfig {
    BetaConfig {
        num_train_timesteps: 1000,
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: BetaSchedule::ScaledLinear,
        rescale_betas_zero_snr: false,
    }
}

/// The world's CLIP text tower at `width`: `layers` layers over the world's vocabulary, 24
/// positions, the projection (for the MMDiT's pooled input) at `width`.
fn text_tower(width: i64, layers: i64) -> Result<ClipTextConfig> {
    let vocab = world_tokenizer(TINY_MAX_LENGTH as usize)?.vocab_size() as i64;
    Ok(ClipTextConfig {
        vocab_size: vocab,
        hidden_size: width,
        intermediate_size: 4 * width,
        projection_dim: Some(width),
        num_hidden_layers: layers,
        num_attention_heads: 4,
        max_position_embeddings: TINY_MAX_LENGTH,
        hidden_act: "gelu".into(),
        layer_norm_eps: 1e-5,
        attention_dropout: 0.0,
        dropout: 0.0,
        pad_token_id: Some(EOS_ID),
        bos_token_id: Some(BOS_ID),
        eos_token_id: EOS_ID,
    })
}

fn mmdit(patch_size: i64, num_layers: i64, width: i64, heads: i64) -> Sd3Config {
    Sd3Config {
        sample_size: 32,
        patch_size,
        in_channels: 3,
        num_layers,
        attention_head_dim: width / heads,
        num_attention_heads: heads,
        joint_attention_dim: 128,
        caption_projection_dim: width,
        pooled_projection_dim: 128,
        out_channels: Some(3),
        pos_embed_max_size: Some(32 / patch_size),
        dual_attention_layers: Vec::new(),
        qk_norm: None,
    }
}

impl ShapesConfig {
    pub const PRESETS: &'static [&'static str] = &["tiny", "mmdit", "unet"];

    /// `tiny`: this project's own config (no upstream model has it), small enough for tests
    /// and the first base: MMDiT on 32 x 32 x 3 pixels in 4 x 4 patches (64 image tokens), 4
    /// joint blocks of width 128 (4 heads of 32). CLIP: 2 layers of width 128 over the world's
    /// vocabulary, 24 positions; its projection (128) feeds `pooled_projections`.
    pub fn tiny() -> Result<Self> {
        Self::checked(
            text_tower(128, 2)?,
            Denoiser::Transformer(mmdit(4, 4, 128, 4)),
            0.0,
        )
    }

    /// `mmdit`: the shapes world's MMDiT base (assets/shapes-mmdit): 2 x 2 patches (256 image
    /// tokens, so an object of 8 to 13 px spans 4 to 6 tokens a side and its outline is
    /// drawable), 4 joint blocks of width 96 (4 heads of 24), the same CLIP tower.
    pub fn mmdit() -> Result<Self> {
        Self::checked(
            text_tower(128, 2)?,
            Denoiser::Transformer(mmdit(2, 4, 96, 4)),
            0.0,
        )
    }

    /// `unet`: the shapes world's UNet base (assets/shapes-unet), SD1.5's block layout scaled
    /// down to 32 x 32 pixels: three levels (32, 16, 8 px) of widths 32 / 64 / 64, one resnet
    /// per down level, cross-attention on the 16 and 8 px levels and in the middle (SD1.5
    /// attends at every level but the last; at 32 px the 1024-token self-attention would cost
    /// more than the rest of the network), 4 heads, the CLIP tower's 128-wide last hidden
    /// state as `encoder_hidden_states`.
    pub fn unet() -> Result<Self> {
        let unet = UNetConfig {
            sample_size: Some(PerBlock::One(32)),
            in_channels: 3,
            out_channels: 3,
            down_block_types: [DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN]
                .map(String::from)
                .into(),
            up_block_types: [CROSS_ATTN_UP, CROSS_ATTN_UP, UP].map(String::from).into(),
            block_out_channels: vec![32, 64, 64],
            layers_per_block: PerBlock::One(1),
            cross_attention_dim: PerBlock::One(128),
            attention_head_dim: PerBlock::One(4),
            norm_num_groups: Some(32),
            ..UNetConfig::default()
        };
        // CLIPTextModel: SD1.5's UNet takes no pooled vector, so the tower has no projection.
        let text = ClipTextConfig {
            projection_dim: None,
            ..text_tower(128, 2)?
        };
        Self::checked(text, Denoiser::Unet(Box::new(unet)), UNET_PIXEL_SHIFT)
    }

    fn checked(text_encoder: ClipTextConfig, denoiser: Denoiser, pixel_shift: f64) -> Result<Self> {
        let cfg = Self {
            text_encoder,
            denoiser,
            pixel_shift,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Self::tiny(),
            "mmdit" => Self::mmdit(),
            "unet" => Self::unet(),
            other => Err(Error::Recipe(format!(
                "backbone shapes: unknown preset `{other}` (known: {})",
                Self::PRESETS.join(", ")
            ))),
        }
    }

    /// Reads `text_encoder/config.json` and `transformer/config.json` (or `unet/config.json`)
    /// of a pipeline folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let text_encoder = ClipTextConfig::from_file(&dir.join("text_encoder/config.json"))?;
        let tr = dir.join(TRANSFORMER).join("config.json");
        let un = dir.join(UNET).join("config.json");
        let denoiser =
            match (tr.is_file(), un.is_file()) {
                (true, false) => Denoiser::Transformer(Sd3Config::from_file(&tr)?),
                (false, true) => Denoiser::Unet(Box::new(UNetConfig::from_file(&un)?)),
                (true, true) => {
                    return Err(Error::file(
                        dir,
                        "holds both transformer/ and unet/: a shapes model has one denoiser",
                    ))
                }
                (false, false) => return Err(Error::file(
                    dir,
                    "no transformer/config.json or unet/config.json: not a shapes pipeline folder",
                )),
            };
        let index = dir.join("model_index.json");
        let pixel_shift = match std::fs::read_to_string(&index) {
            Ok(text) => {
                let v = softalign_core::json_file::parse_value(&index, &text)?;
                match v.get(PIXEL_SHIFT_KEY) {
                    None | Some(serde_json::Value::Null) => 0.0,
                    Some(x) => x.as_f64().ok_or_else(|| {
                        Error::file(
                            &index,
                            format!("field `{PIXEL_SHIFT_KEY}`: expected a number"),
                        )
                    })?,
                }
            }
            Err(_) => 0.0,
        };
        let cfg = Self {
            text_encoder,
            denoiser,
            pixel_shift,
        };
        cfg.validate().map_err(|e| Error::file(dir, e))?;
        Ok(cfg)
    }

    /// The sub-models must fit together: the text tower's width is the denoiser's context
    /// width (and its projection the MMDiT's pooled width); the image is RGB in and out.
    pub fn validate(&self) -> Result<()> {
        let te = &self.text_encoder;
        te.validate()?;
        let bad = |m: String| Err(Error::invalid(format!("shapes model: {m}")));
        let (context, inc, outc) = match &self.denoiser {
            Denoiser::Transformer(tr) => {
                tr.validate()?;
                match te.projection_dim {
                    Some(p) if p == tr.pooled_projection_dim => {}
                    p => {
                        return bad(format!(
                            "text_encoder.projection_dim {p:?} must equal \
                             transformer.pooled_projection_dim {}",
                            tr.pooled_projection_dim
                        ))
                    }
                }
                (tr.joint_attention_dim, tr.in_channels, tr.out_channels())
            }
            Denoiser::Unet(u) => {
                u.validate()?;
                if u.has_text_time() {
                    return bad("the UNet takes no SDXL text_time inputs".into());
                }
                if u.sample_hw().is_none() {
                    return bad("the UNet's config needs a `sample_size`".into());
                }
                (
                    u.resolve()?.cross_attention_dim,
                    u.in_channels,
                    u.out_channels,
                )
            }
        };
        if te.hidden_size != context {
            return bad(format!(
                "text_encoder.hidden_size {} must equal the {}'s context width {context}",
                te.hidden_size,
                self.denoiser.folder()
            ));
        }
        if !self.pixel_shift.is_finite() || self.pixel_shift.abs() > 1.0 {
            return bad(format!(
                "{PIXEL_SHIFT_KEY} = {} (must be within [-1, 1], a shift of RGB in [-1, 1])",
                self.pixel_shift
            ));
        }
        if inc != 3 || outc != 3 {
            return bad(format!(
                "a pixel-space RGB model needs 3 input and output channels (got {inc} and {outc})"
            ));
        }
        Ok(())
    }

    /// (C, H, W) of a sample.
    pub fn sample_shape(&self) -> [i64; 3] {
        match &self.denoiser {
            Denoiser::Transformer(t) => [t.in_channels, t.sample_size, t.sample_size],
            Denoiser::Unet(u) => {
                let (h, w) = u.sample_hw().unwrap_or((32, 32));
                [u.in_channels, h, w]
            }
        }
    }

    /// Token ids per prompt: the text tower's positions.
    pub fn max_length(&self) -> usize {
        self.text_encoder.max_position_embeddings as usize
    }
}
