//! The shapes world's text-to-image model: a CLIP text tower and an SD3 MMDiT, in pixel space.
//! Its config is the pair of sub-model configs, as a diffusers pipeline folder holds them
//! (`text_encoder/config.json`, `transformer/config.json`).
use std::path::Path;

use softalign_core::{Error, Result};

use crate::clip::{ClipTextConfig, ClipTokenizer};
use crate::sd3::Sd3Config;

/// Token ids of the word-level vocabulary ([`ClipTokenizer::build_word_level`]).
pub const BOS_ID: i64 = 0;
pub const EOS_ID: i64 = 1;

/// Text positions of the tiny preset: the longest caption of the world (four objects of four
/// kinds, "a photo of a red circle and ... and a purple diamond") is 18 words + BOS + EOS = 20
/// ids; 24 leaves room and keeps the model small. Checked by the tests.
pub const TINY_MAX_LENGTH: i64 = 24;

#[derive(Debug, Clone, PartialEq)]
pub struct ShapesConfig {
    pub text_encoder: ClipTextConfig,
    pub transformer: Sd3Config,
}

/// The world's tokenizer: the word-level vocabulary of `softalign_worlds::shapes::vocabulary()`,
/// padded and truncated to `max_length` ids.
pub fn world_tokenizer(max_length: usize) -> Result<ClipTokenizer> {
    ClipTokenizer::build_word_level(&softalign_worlds::shapes::vocabulary(), max_length)
}

impl ShapesConfig {
    pub const PRESETS: &'static [&'static str] = &["tiny"];

    /// `tiny`: this project's own config (no upstream model has it), sized so that the
    /// project's trainer pretrains it on a 2-core CPU in about 20 minutes
    /// (recipes/shapes/pretrain.toml). MMDiT: 32 x 32 x 3 pixels in 4 x 4 patches (64 image
    /// tokens), 4 joint blocks of width 128 (4 heads of 32). CLIP: 2 layers of width 128 over the
    /// world's vocabulary, 24 positions; its projection (128) feeds `pooled_projections`.
    pub fn tiny() -> Result<Self> {
        let vocab = world_tokenizer(TINY_MAX_LENGTH as usize)?.vocab_size() as i64;
        let width = 128;
        let text_encoder = ClipTextConfig {
            vocab_size: vocab,
            hidden_size: width,
            intermediate_size: 4 * width,
            projection_dim: Some(width),
            num_hidden_layers: 2,
            num_attention_heads: 4,
            max_position_embeddings: TINY_MAX_LENGTH,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
            attention_dropout: 0.0,
            dropout: 0.0,
            pad_token_id: Some(EOS_ID),
            bos_token_id: Some(BOS_ID),
            eos_token_id: EOS_ID,
        };
        let transformer = Sd3Config {
            sample_size: 32,
            patch_size: 4,
            in_channels: 3,
            num_layers: 4,
            attention_head_dim: 32,
            num_attention_heads: 4,
            joint_attention_dim: width,
            caption_projection_dim: 128,
            pooled_projection_dim: width,
            out_channels: Some(3),
            pos_embed_max_size: Some(8),
            dual_attention_layers: Vec::new(),
            qk_norm: None,
        };
        let cfg = Self {
            text_encoder,
            transformer,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Self::tiny(),
            other => Err(Error::Recipe(format!(
                "backbone shapes: unknown preset `{other}` (known: {})",
                Self::PRESETS.join(", ")
            ))),
        }
    }

    /// Reads `text_encoder/config.json` and `transformer/config.json` of a pipeline folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let cfg = Self {
            text_encoder: ClipTextConfig::from_file(&dir.join("text_encoder/config.json"))?,
            transformer: Sd3Config::from_file(&dir.join("transformer/config.json"))?,
        };
        cfg.validate().map_err(|e| Error::file(dir, e))?;
        Ok(cfg)
    }

    /// The sub-models must fit together: the text tower's width is the MMDiT's context width,
    /// its projection the pooled width; the image is RGB in and out.
    pub fn validate(&self) -> Result<()> {
        let (te, tr) = (&self.text_encoder, &self.transformer);
        te.validate()?;
        tr.validate()?;
        let bad = |m: String| Err(Error::invalid(format!("shapes model: {m}")));
        if te.hidden_size != tr.joint_attention_dim {
            return bad(format!(
                "text_encoder.hidden_size {} must equal transformer.joint_attention_dim {}",
                te.hidden_size, tr.joint_attention_dim
            ));
        }
        match te.projection_dim {
            Some(p) if p == tr.pooled_projection_dim => {}
            p => {
                return bad(format!(
                "text_encoder.projection_dim {p:?} must equal transformer.pooled_projection_dim {}",
                tr.pooled_projection_dim
            ))
            }
        }
        if tr.in_channels != 3 || tr.out_channels() != 3 {
            return bad(format!(
                "a pixel-space RGB model needs in_channels = out_channels = 3 (got {} and {})",
                tr.in_channels,
                tr.out_channels()
            ));
        }
        Ok(())
    }

    /// (C, H, W) of a sample.
    pub fn sample_shape(&self) -> [i64; 3] {
        let t = &self.transformer;
        [t.in_channels, t.sample_size, t.sample_size]
    }

    /// Token ids per prompt: the text tower's positions.
    pub fn max_length(&self) -> usize {
        self.text_encoder.max_position_embeddings as usize
    }
}
