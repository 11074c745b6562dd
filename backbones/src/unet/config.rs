//! `UNet2DConditionModel`'s config.json: every key diffusers writes, its defaults, the presets
//! of the released models, and the checks that refuse variants this code does not implement.
use std::path::Path;

use serde::{Deserialize, Serialize};
use softalign_core::{Error, Result};

pub const CLASS_NAME: &str = "UNet2DConditionModel";

pub const CROSS_ATTN_DOWN: &str = "CrossAttnDownBlock2D";
pub const DOWN: &str = "DownBlock2D";
pub const CROSS_ATTN_UP: &str = "CrossAttnUpBlock2D";
pub const UP: &str = "UpBlock2D";
pub const CROSS_ATTN_MID: &str = "UNetMidBlock2DCrossAttn";

/// A value given once for all blocks or once per down block, as diffusers accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "expected one value or one per block (a list)")]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// One value per down block; `field` names the key in errors.
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::invalid(format!(
                "`{field}` has {} entries for {n} down blocks",
                v.len()
            ))),
        }
    }
}

/// Field names and defaults as in diffusers' `UNet2DConditionModel.__init__`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UNetConfig {
    pub sample_size: Option<PerBlock<i64>>,
    pub in_channels: i64,
    pub out_channels: i64,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: PerBlock<i64>,
    pub downsample_padding: i64,
    pub mid_block_scale_factor: f64,
    pub dropout: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<i64>,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<i64>,
    pub transformer_layers_per_block: PerBlock<i64>,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    pub encoder_hid_dim: Option<i64>,
    pub encoder_hid_dim_type: Option<String>,
    /// The number of HEADS per block in every released config (a diffusers naming accident
    /// kept for compatibility), unless `num_attention_heads` is given.
    pub attention_head_dim: PerBlock<i64>,
    pub num_attention_heads: Option<PerBlock<i64>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<i64>,
    pub num_class_embeds: Option<i64>,
    /// Softmax in fp32 for half-precision weights (SD2.x); no effect in fp32.
    pub upcast_attention: Option<bool>,
    pub resnet_time_scale_shift: String,
    pub resnet_skip_time_act: bool,
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<i64>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<i64>,
    pub conv_in_kernel: i64,
    pub conv_out_kernel: i64,
    pub projection_class_embeddings_input_dim: Option<i64>,
    pub attention_type: String,
    pub class_embeddings_concat: bool,
    pub mid_block_only_cross_attention: Option<bool>,
    pub cross_attention_norm: Option<String>,
    pub addition_embed_type_num_heads: i64,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: strings(&[CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, DOWN]),
            mid_block_type: Some(CROSS_ATTN_MID.into()),
            up_block_types: strings(&[UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP]),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: Some(false),
            resnet_time_scale_shift: "default".into(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".into(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_embed_type_num_heads: 64,
        }
    }
}

/// The per-block numbers diffusers derives from the config in `__init__`.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub layers_per_block: Vec<i64>,
    pub transformer_layers_per_block: Vec<i64>,
    /// Heads per down block (`num_attention_heads or attention_head_dim`).
    pub heads: Vec<i64>,
    pub cross_attention_dim: i64,
    pub time_embed_dim: i64,
}

impl UNetConfig {
    /// stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json.
    pub fn sd15() -> Self {
        Self {
            sample_size: Some(PerBlock::One(64)),
            cross_attention_dim: PerBlock::One(768),
            ..Self::default()
        }
    }

    /// stabilityai/stable-diffusion-xl-base-1.0, unet/config.json.
    pub fn sdxl() -> Self {
        Self {
            sample_size: Some(PerBlock::One(128)),
            down_block_types: strings(&[DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN]),
            up_block_types: strings(&[CROSS_ATTN_UP, CROSS_ATTN_UP, UP]),
            block_out_channels: vec![320, 640, 1280],
            attention_head_dim: PerBlock::Each(vec![5, 10, 20]),
            cross_attention_dim: PerBlock::One(2048),
            transformer_layers_per_block: PerBlock::Each(vec![1, 2, 10]),
            use_linear_projection: true,
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            upcast_attention: None,
            ..Self::default()
        }
    }

    pub const PRESETS: &'static [&'static str] = &["sd15", "sdxl"];

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "sd15" | "sd1.5" => Ok(Self::sd15()),
            "sdxl" => Ok(Self::sdxl()),
            other => Err(Error::Recipe(format!(
                "backbone unet: unknown preset `{other}` (known: {})",
                Self::PRESETS.join(", ")
            ))),
        }
    }

    /// Reads a config.json; unknown keys are an error naming them.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = crate::diffusers_config::read(path, CLASS_NAME)?;
        cfg.validate().map_err(|e| Error::file(path, e))?;
        Ok(cfg)
    }

    /// The config.json diffusers would write.
    pub fn to_json(&self) -> serde_json::Value {
        crate::diffusers_config::to_json(self, CLASS_NAME)
    }

    pub fn has_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    pub fn groups(&self) -> i64 {
        self.norm_num_groups.unwrap_or(32)
    }

    /// Latent side of the released model, where the config says.
    pub fn sample_hw(&self) -> Option<(i64, i64)> {
        match &self.sample_size {
            Some(PerBlock::One(s)) => Some((*s, *s)),
            Some(PerBlock::Each(v)) if v.len() == 2 => Some((v[0], v[1])),
            _ => None,
        }
    }

    /// Width of `text_embeds` for `text_time`: the add embedding's input minus the time ids.
    pub fn text_embeds_dim(&self) -> Option<i64> {
        match (
            self.projection_class_embeddings_input_dim,
            self.addition_time_embed_dim,
        ) {
            (Some(p), Some(a)) if self.has_text_time() => Some(p - 6 * a),
            _ => None,
        }
    }

    pub fn resolve(&self) -> Result<Resolved> {
        let n = self.down_block_types.len();
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim);
        let field = if self.num_attention_heads.is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        let cross = self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        if cross.windows(2).any(|w| w[0] != w[1]) {
            return Err(Error::invalid(
                "`cross_attention_dim`: a different width per block is not supported (one text \
                 context feeds every block)",
            ));
        }
        Ok(Resolved {
            layers_per_block: self.layers_per_block.expand(n, "layers_per_block")?,
            transformer_layers_per_block: self
                .transformer_layers_per_block
                .expand(n, "transformer_layers_per_block")?,
            heads: heads.expand(n, field)?,
            cross_attention_dim: cross[0],
            time_embed_dim: self
                .time_embedding_dim
                .unwrap_or(self.block_out_channels.first().copied().unwrap_or(0) * 4),
        })
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: String| Err(Error::invalid(format!("`{f}` {why}")));
        let unsupported = |f: &str, v: &dyn std::fmt::Debug| {
            Err(Error::invalid(format!(
                "`{f}` = {v:?} is not supported by this UNet (SD1.5/SD2/SDXL family)"
            )))
        };
        let n = self.down_block_types.len();
        if n == 0 || self.block_out_channels.len() != n {
            return bad(
                "block_out_channels",
                format!(
                    "has {} entries for {n} down blocks",
                    self.block_out_channels.len()
                ),
            );
        }
        if self.up_block_types.len() != n {
            return bad(
                "up_block_types",
                format!(
                    "has {} entries for {n} down blocks",
                    self.up_block_types.len()
                ),
            );
        }
        for t in &self.down_block_types {
            if t != CROSS_ATTN_DOWN && t != DOWN {
                return unsupported("down_block_types", t);
            }
        }
        for t in &self.up_block_types {
            if t != CROSS_ATTN_UP && t != UP {
                return unsupported("up_block_types", t);
            }
        }
        match self.mid_block_type.as_deref() {
            None | Some(CROSS_ATTN_MID) => {}
            Some(o) => return unsupported("mid_block_type", &o),
        }
        for (f, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if v <= 0 {
                return bad(f, format!("must be positive (got {v})"));
            }
        }
        for (f, v) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if v % 2 == 0 {
                return bad(f, format!("must be odd (got {v})"));
            }
        }
        if self
            .only_cross_attention
            .expand(n, "only_cross_attention")?
            .contains(&true)
        {
            return unsupported("only_cross_attention", &self.only_cross_attention);
        }
        if self.mid_block_only_cross_attention == Some(true) {
            return unsupported("mid_block_only_cross_attention", &true);
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return unsupported("act_fn", &self.act_fn);
        }
        if self.norm_num_groups.is_none() {
            return unsupported("norm_num_groups", &"null");
        }
        if self
            .reverse_transformer_layers_per_block
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return unsupported(
                "reverse_transformer_layers_per_block",
                &self.reverse_transformer_layers_per_block,
            );
        }
        if self.encoder_hid_dim_type.is_some() || self.encoder_hid_dim.is_some() {
            return unsupported("encoder_hid_dim_type", &self.encoder_hid_dim_type);
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention", &true);
        }
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            return unsupported("class_embed_type", &self.class_embed_type);
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                let (Some(a), Some(p)) = (
                    self.addition_time_embed_dim,
                    self.projection_class_embeddings_input_dim,
                ) else {
                    return bad(
                        "addition_embed_type",
                        "\"text_time\" needs `addition_time_embed_dim` and \
                         `projection_class_embeddings_input_dim`"
                            .into(),
                    );
                };
                if a <= 0 || a % 2 != 0 || p <= 6 * a {
                    return bad(
                        "projection_class_embeddings_input_dim",
                        format!(
                            "({p}) must exceed 6 x addition_time_embed_dim ({a}, even) by the \
                             pooled text width"
                        ),
                    );
                }
            }
            Some(o) => return unsupported("addition_embed_type", &o),
        }
        if self.resnet_time_scale_shift != "default" {
            return unsupported("resnet_time_scale_shift", &self.resnet_time_scale_shift);
        }
        if self.resnet_skip_time_act {
            return unsupported("resnet_skip_time_act", &true);
        }
        if self.resnet_out_scale_factor != 1.0 {
            return unsupported("resnet_out_scale_factor", &self.resnet_out_scale_factor);
        }
        if self.time_embedding_type != "positional" {
            return unsupported("time_embedding_type", &self.time_embedding_type);
        }
        if self.time_embedding_act_fn.is_some() {
            return unsupported("time_embedding_act_fn", &self.time_embedding_act_fn);
        }
        if self.timestep_post_act.is_some() {
            return unsupported("timestep_post_act", &self.timestep_post_act);
        }
        if self.time_cond_proj_dim.is_some() {
            return unsupported("time_cond_proj_dim", &self.time_cond_proj_dim);
        }
        if self.attention_type != "default" {
            return unsupported("attention_type", &self.attention_type);
        }
        if self.class_embeddings_concat {
            return unsupported("class_embeddings_concat", &true);
        }
        if self.cross_attention_norm.is_some() {
            return unsupported("cross_attention_norm", &self.cross_attention_norm);
        }
        if !(self.mid_block_scale_factor.is_finite() && self.mid_block_scale_factor > 0.0) {
            return bad(
                "mid_block_scale_factor",
                format!("must be positive (got {})", self.mid_block_scale_factor),
            );
        }
        if !(0..=1).contains(&self.downsample_padding) {
            return bad(
                "downsample_padding",
                format!("must be 0 or 1 (got {})", self.downsample_padding),
            );
        }
        let r = self.resolve()?;
        let groups = self.groups();
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c <= 0 || c % groups != 0 {
                return bad(
                    "block_out_channels",
                    format!(
                        "[{i}] = {c} must be a positive multiple of norm_num_groups ({groups})"
                    ),
                );
            }
            if r.heads[i] <= 0 || c % r.heads[i] != 0 {
                return bad(
                    "attention_head_dim",
                    format!(
                        "[{i}]: {} heads do not divide the block's {c} channels",
                        r.heads[i]
                    ),
                );
            }
            // Up block i has block_out_channels reversed[i] channels and heads reversed[i].
            if r.layers_per_block[i] <= 0 || r.transformer_layers_per_block[i] <= 0 {
                return bad(
                    "layers_per_block",
                    "and `transformer_layers_per_block` must be positive".into(),
                );
            }
        }
        if r.cross_attention_dim <= 0 {
            return bad("cross_attention_dim", "must be positive".into());
        }
        if r.time_embed_dim <= 0 || self.block_out_channels[0] % 2 != 0 {
            return bad(
                "block_out_channels",
                "[0] must be even (it is the sinusoid width)".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_round_trip() {
        for p in UNetConfig::PRESETS {
            let c = UNetConfig::preset(p).unwrap();
            c.validate().unwrap();
            let back: UNetConfig = serde_json::from_value({
                let mut v = c.to_json();
                let m = v.as_object_mut().unwrap();
                m.retain(|k, _| !k.starts_with('_'));
                v
            })
            .unwrap();
            assert_eq!(back, c);
        }
        assert_eq!(UNetConfig::sdxl().text_embeds_dim(), Some(1280));
        assert_eq!(UNetConfig::sdxl().resolve().unwrap().heads, vec![5, 10, 20]);
    }

    #[test]
    fn unsupported_variants_name_the_field() {
        let c = UNetConfig {
            class_embed_type: Some("timestep".into()),
            ..UNetConfig::sd15()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("class_embed_type"));
        let c = UNetConfig {
            attention_head_dim: PerBlock::Each(vec![8, 8]),
            ..UNetConfig::sd15()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("attention_head_dim"));
    }
}
