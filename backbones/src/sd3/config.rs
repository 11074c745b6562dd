//! `SD3Transformer2DModel`'s config.json: every key diffusers writes, its defaults, and the
//! presets of the released models.
use std::path::Path;

use serde::{Deserialize, Serialize};
use softalign_core::{Error, Result};

pub const CLASS_NAME: &str = "SD3Transformer2DModel";

/// Field names and defaults as in diffusers' `SD3Transformer2DModel.__init__`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sd3Config {
    pub sample_size: i64,
    pub patch_size: i64,
    pub in_channels: i64,
    pub num_layers: i64,
    pub attention_head_dim: i64,
    pub num_attention_heads: i64,
    pub joint_attention_dim: i64,
    pub caption_projection_dim: i64,
    pub pooled_projection_dim: i64,
    pub out_channels: Option<i64>,
    pub pos_embed_max_size: Option<i64>,
    pub dual_attention_layers: Vec<i64>,
    pub qk_norm: Option<String>,
}

impl Default for Sd3Config {
    fn default() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 18,
            attention_head_dim: 64,
            num_attention_heads: 18,
            joint_attention_dim: 4096,
            caption_projection_dim: 1152,
            pooled_projection_dim: 2048,
            out_channels: Some(16),
            pos_embed_max_size: Some(96),
            dual_attention_layers: Vec::new(),
            qk_norm: None,
        }
    }
}

impl Sd3Config {
    /// stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json.
    pub fn sd3_medium() -> Self {
        Self {
            sample_size: 128,
            num_layers: 24,
            num_attention_heads: 24,
            caption_projection_dim: 1536,
            pos_embed_max_size: Some(192),
            ..Self::default()
        }
    }

    /// stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X: dual
    /// attention in blocks 0..=12, RMS qk-norm).
    pub fn sd35_medium() -> Self {
        Self {
            pos_embed_max_size: Some(384),
            dual_attention_layers: (0..=12).collect(),
            qk_norm: Some("rms_norm".into()),
            ..Self::sd3_medium()
        }
    }

    /// stabilityai/stable-diffusion-3.5-large, transformer/config.json.
    pub fn sd35_large() -> Self {
        Self {
            num_layers: 38,
            num_attention_heads: 38,
            caption_projection_dim: 2432,
            pos_embed_max_size: Some(192),
            qk_norm: Some("rms_norm".into()),
            ..Self::default()
        }
    }

    pub const PRESETS: &'static [&'static str] = &["sd3-medium", "sd3.5-medium", "sd3.5-large"];

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "sd3-medium" => Ok(Self::sd3_medium()),
            "sd3.5-medium" => Ok(Self::sd35_medium()),
            "sd3.5-large" => Ok(Self::sd35_large()),
            other => Err(Error::Recipe(format!(
                "backbone sd3: unknown preset `{other}` (known: {})",
                Self::PRESETS.join(", ")
            ))),
        }
    }

    /// Reads a config.json; unknown keys are an error naming them (a typo or a model this
    /// code does not implement must not load silently).
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = crate::diffusers_config::read(path, CLASS_NAME)?;
        cfg.validate().map_err(|e| Error::file(path, e))?;
        Ok(cfg)
    }

    /// The config.json diffusers would write.
    pub fn to_json(&self) -> serde_json::Value {
        crate::diffusers_config::to_json(self, CLASS_NAME)
    }

    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: String| Err(Error::invalid(format!("`{f}` {why}")));
        for (f, v) in [
            ("sample_size", self.sample_size),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("num_layers", self.num_layers),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("caption_projection_dim", self.caption_projection_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("out_channels", self.out_channels()),
        ] {
            if v <= 0 {
                return bad(f, format!("must be positive (got {v})"));
            }
        }
        // The joint blocks read the context stream at the image stream's width.
        if self.caption_projection_dim != self.inner_dim() {
            return bad(
                "caption_projection_dim",
                format!(
                    "({}) must equal num_attention_heads * attention_head_dim ({})",
                    self.caption_projection_dim,
                    self.inner_dim()
                ),
            );
        }
        if let Some(m) = self.pos_embed_max_size.filter(|m| *m <= 0) {
            return bad(
                "pos_embed_max_size",
                format!("must be a positive integer or null (got {m})"),
            );
        }
        if self.inner_dim() % 4 != 0 {
            return bad(
                "num_attention_heads",
                format!(
                    "* attention_head_dim ({}) must be divisible by 4 for the 2-D sin-cos table",
                    self.inner_dim()
                ),
            );
        }
        if let Some(&l) = self
            .dual_attention_layers
            .iter()
            .find(|&&l| l < 0 || l >= self.num_layers)
        {
            return bad(
                "dual_attention_layers",
                format!("names block {l}, the model has {}", self.num_layers),
            );
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => {}
            Some(o) => {
                return bad(
                    "qk_norm",
                    format!("`{o}` is not supported (null or \"rms_norm\")"),
                )
            }
        }
        Ok(())
    }
}
