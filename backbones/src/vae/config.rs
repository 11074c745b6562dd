//! `AutoencoderKL`'s config.json (diffusers 0.42.1, models/autoencoders/autoencoder_kl.py) with
//! its defaults. The latent scaling constants are the folder's: nothing here hard-codes 0.18215.
use std::path::Path;

use serde::{Deserialize, Serialize};
use softalign_core::{json_file, Error, Result};

pub const CLASS_NAME: &str = "AutoencoderKL";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaeConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub act_fn: String,
    pub latent_channels: i64,
    pub norm_num_groups: i64,
    pub sample_size: serde_json::Value,
    /// Latents fed to the denoiser are `(z - shift_factor) * scaling_factor`.
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    /// Per-channel statistics some VAEs publish (not used by AutoencoderKL's own code).
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: serde_json::json!(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(json_file::read_value(path)?).map_err(|e| Error::file(path, e))
    }

    /// Parses a config object; diffusers' bookkeeping keys (`_class_name`, `_diffusers_version`,
    /// `_name_or_path`, ...) are skipped, any other unknown key is an error.
    pub fn from_json(json: serde_json::Value) -> Result<Self> {
        let serde_json::Value::Object(mut map) = json else {
            return Err(Error::invalid("AutoencoderKL config: not a JSON object"));
        };
        if let Some(class) = map.get("_class_name").and_then(|c| c.as_str()) {
            if class != CLASS_NAME {
                return Err(Error::invalid(format!(
                    "`_class_name` is `{class}`, expected `{CLASS_NAME}`"
                )));
            }
        }
        map.retain(|k, _| !k.starts_with('_'));
        let cfg: Self = json_file::from_value(serde_json::Value::Object(map))
            .map_err(|e| Error::invalid(format!("AutoencoderKL config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        v["_class_name"] = CLASS_NAME.into();
        v
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::invalid("`block_out_channels` is empty"));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::invalid(format!(
                "`down_block_types` ({}) and `up_block_types` ({}) must have one entry per \
                 `block_out_channels` ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(Error::invalid(format!(
                "down block type `{t}` is not supported (DownEncoderBlock2D)"
            )));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Err(Error::invalid(format!(
                "up block type `{t}` is not supported (UpDecoderBlock2D)"
            )));
        }
        if self.act_fn != "silu" {
            return Err(Error::invalid(format!(
                "`act_fn` `{}` is not supported (silu)",
                self.act_fn
            )));
        }
        for (name, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if v <= 0 {
                return Err(Error::invalid(format!(
                    "`{name}` must be positive, got {v}"
                )));
            }
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| **c <= 0 || **c % self.norm_num_groups != 0)
        {
            return Err(Error::invalid(format!(
                "`block_out_channels` entry {c} is not a positive multiple of `norm_num_groups` {}",
                self.norm_num_groups
            )));
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return Err(Error::invalid(format!(
                "`scaling_factor` must be finite and nonzero, got {}",
                self.scaling_factor
            )));
        }
        Ok(())
    }

    /// How many times the encoder halves the resolution.
    pub fn downsample_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }
}
