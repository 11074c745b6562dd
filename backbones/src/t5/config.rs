//! `T5Config`'s config.json as far as the encoder reads it (transformers 5.23.0,
//! models/t5/configuration_t5.py), with its defaults.
//!
//! Unlike CLIP's config, unknown keys are accepted: T5 folders carry decoder, generation and
//! task keys (`num_decoder_layers`, `task_specific_params`, `n_positions`, ...) that the encoder
//! never reads. The keys that do change the encoder are parsed and checked.
use std::path::Path;

use serde::Deserialize;
use softalign_core::{json_file, Error, Result};

/// The `model_type` of a T5 (v1.0, v1.1, flan) checkpoint; `umt5` / `mt5` differ in layout.
pub const MODEL_TYPE: &str = "t5";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct T5Config {
    pub vocab_size: i64,
    pub d_model: i64,
    /// Width of one attention head.
    pub d_kv: i64,
    pub d_ff: i64,
    /// Encoder layers.
    pub num_layers: i64,
    pub num_heads: i64,
    pub relative_attention_num_buckets: i64,
    pub relative_attention_max_distance: i64,
    pub layer_norm_epsilon: f64,
    /// `relu` (T5 v1.0), `gated-gelu` (v1.1, the SD3 / Flux encoder), `gated-silu`, ...
    pub feed_forward_proj: String,
    pub is_decoder: bool,
    pub model_type: Option<String>,
    pub pad_token_id: Option<i64>,
}

impl Default for T5Config {
    fn default() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
            is_decoder: false,
            model_type: None,
            pad_token_id: Some(0),
        }
    }
}

/// transformers' `ACT2FN` entries a T5 feed-forward may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T5Activation {
    Relu,
    /// Exact (erf) GELU.
    Gelu,
    /// Tanh approximation (`gelu_new`, what `gated-gelu` maps to).
    GeluTanh,
    Silu,
}

impl T5Config {
    /// google/t5-v1_1-xxl as converted for `text_encoder_3` of
    /// stabilityai/stable-diffusion-3-medium-diffusers (config.json there).
    pub fn t5_v1_1_xxl() -> Self {
        Self {
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            feed_forward_proj: "gated-gelu".into(),
            model_type: Some(MODEL_TYPE.into()),
            ..Self::default()
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(json_file::read_value(path)?).map_err(|e| Error::file(path, e))
    }

    pub fn from_json(json: serde_json::Value) -> Result<Self> {
        let cfg: Self =
            json_file::from_value(json).map_err(|e| Error::invalid(format!("T5 config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether the feed-forward is gated (`gated-*`: `wi_0`, `wi_1`) or plain (`wi`).
    pub fn is_gated(&self) -> bool {
        self.feed_forward_proj.starts_with("gated-")
    }

    /// The feed-forward activation, as transformers derives `dense_act_fn`.
    pub fn activation(&self) -> Result<T5Activation> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let name = match parts.as_slice() {
            [act] => *act,
            ["gated", act] => *act,
            _ => {
                return Err(Error::invalid(format!(
                    "`feed_forward_proj` `{}` is not `ACT` or `gated-ACT`",
                    self.feed_forward_proj
                )))
            }
        };
        // transformers: "gated-gelu" means gelu_new (the tanh approximation) for backwards
        // compatibility with the original T5 v1.1 checkpoints.
        if self.feed_forward_proj == "gated-gelu" {
            return Ok(T5Activation::GeluTanh);
        }
        match name {
            "relu" => Ok(T5Activation::Relu),
            "gelu" => Ok(T5Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(T5Activation::GeluTanh),
            "silu" | "swish" => Ok(T5Activation::Silu),
            other => Err(Error::invalid(format!(
                "`feed_forward_proj` activation `{other}` is not supported (relu, gelu, gelu_new, \
                 gelu_pytorch_tanh, silu)"
            ))),
        }
    }

    pub fn inner_dim(&self) -> i64 {
        self.num_heads * self.d_kv
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.model_type {
            if t != MODEL_TYPE {
                return Err(Error::invalid(format!(
                    "`model_type` is `{t}`, expected `{MODEL_TYPE}` (a T5 encoder)"
                )));
            }
        }
        if self.is_decoder {
            return Err(Error::invalid(
                "`is_decoder` is true: only the (bidirectional) T5 encoder is implemented",
            ));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            (
                "relative_attention_max_distance",
                self.relative_attention_max_distance,
            ),
        ] {
            if v <= 0 {
                return Err(Error::invalid(format!(
                    "`{name}` must be positive, got {v}"
                )));
            }
        }
        // Bidirectional buckets halve the count, then half of those are exact offsets.
        if self.relative_attention_num_buckets < 4 {
            return Err(Error::invalid(format!(
                "`relative_attention_num_buckets` must be at least 4, got {}",
                self.relative_attention_num_buckets
            )));
        }
        if self.layer_norm_epsilon.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return Err(Error::invalid(format!(
                "`layer_norm_epsilon` must be positive, got {}",
                self.layer_norm_epsilon
            )));
        }
        self.activation()?;
        Ok(())
    }
}
