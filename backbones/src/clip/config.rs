//! `CLIPTextConfig`'s config.json: the architecture keys transformers reads, their defaults
//! (transformers 5.23.0, models/clip/configuration_clip.py) and the presets of the text encoders
//! the Stable Diffusion pipelines ship.
use std::path::Path;

use serde::{Deserialize, Serialize};
use softalign_core::{json_file, Error, Result};

/// The `model_type` transformers writes for a CLIP text tower.
pub const MODEL_TYPE: &str = "clip_text_model";

/// Keys `PretrainedConfig` writes for its own bookkeeping or for generation and training; none
/// of them changes the text encoder's forward pass. Older transformers releases (4.2x) wrote
/// every generation default into config.json, hence the long tail.
const BOOKKEEPING: &[&str] = &[
    "_name_or_path",
    "_commit_hash",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "initializer_range",
    "initializer_factor",
    "gradient_checkpointing",
    "use_cache",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "torchscript",
    "use_bfloat16",
    "tie_word_embeddings",
    "tie_encoder_decoder",
    "is_decoder",
    "is_encoder_decoder",
    "add_cross_attention",
    "cross_attention_hidden_size",
    "chunk_size_feed_forward",
    "pruned_heads",
    "problem_type",
    "finetuning_task",
    "id2label",
    "label2id",
    "num_labels",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "sep_token_id",
    "decoder_start_token_id",
    "tf_legacy_loss",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
];

/// Field names and defaults as in transformers' `CLIPTextConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    /// Output width of `text_projection` (CLIPTextModelWithProjection only).
    pub projection_dim: Option<i64>,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    /// `quick_gelu` (OpenAI CLIP), `gelu` (OpenCLIP), `gelu_new` / `gelu_pytorch_tanh`.
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// Training-time only; kept so a config round-trips. Must be 0: no dropout is implemented.
    pub attention_dropout: f64,
    /// Written by transformers 4.x; same rule as `attention_dropout`.
    pub dropout: f64,
    pub pad_token_id: Option<i64>,
    pub bos_token_id: Option<i64>,
    /// Where the pooled output is read. `2` selects transformers' legacy rule (the position of
    /// the largest id, which is `<|endoftext|>` in the CLIP vocabulary); any other value the
    /// first position holding this id.
    pub eos_token_id: i64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: Some(512),
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            attention_dropout: 0.0,
            dropout: 0.0,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: 49407,
        }
    }
}

/// The activations transformers' `ACT2FN` maps the `hidden_act` names to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
    /// Tanh approximation of GELU.
    GeluTanh,
}

impl ClipTextConfig {
    /// openai/clip-vit-large-patch14, `text_config` of its config.json; identical to the
    /// `text_encoder/config.json` of SD 1.x and SDXL, and SD3's `text_encoder` (with projection).
    pub fn clip_l() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: Some(768),
            num_attention_heads: 12,
            bos_token_id: Some(0),
            eos_token_id: 2,
            ..Self::default()
        }
    }

    /// laion/CLIP-ViT-bigG-14-laion2B-39B-b160k's text tower as converted by diffusers:
    /// `text_encoder_2/config.json` of stabilityai/stable-diffusion-xl-base-1.0 and of
    /// stabilityai/stable-diffusion-3-medium-diffusers.
    pub fn openclip_bigg() -> Self {
        Self {
            hidden_size: 1280,
            intermediate_size: 5120,
            projection_dim: Some(1280),
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: "gelu".into(),
            bos_token_id: Some(0),
            eos_token_id: 2,
            ..Self::default()
        }
    }

    /// laion/CLIP-ViT-H-14 as SD 2.x ships it (`text_encoder/config.json` of
    /// stabilityai/stable-diffusion-2-1): 23 of the 24 layers were kept, since SD 2 conditions on
    /// the penultimate layer.
    pub fn openclip_h() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            projection_dim: Some(512),
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: "gelu".into(),
            bos_token_id: Some(0),
            eos_token_id: 2,
            ..Self::default()
        }
    }

    pub const PRESETS: &'static [&'static str] = &["clip-l", "openclip-bigg", "openclip-h"];

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "clip-l" => Ok(Self::clip_l()),
            "openclip-bigg" => Ok(Self::openclip_bigg()),
            "openclip-h" => Ok(Self::openclip_h()),
            other => Err(Error::Recipe(format!(
                "clip text encoder: unknown preset `{other}` (known: {})",
                Self::PRESETS.join(", ")
            ))),
        }
    }

    /// Reads a transformers config.json. Bookkeeping keys are skipped; any other key this code
    /// does not know is an error naming it, so a model variant it does not implement never loads
    /// silently.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(json_file::read_value(path)?).map_err(|e| Error::file(path, e))
    }

    /// As [`Self::from_file`], from parsed JSON. A full `CLIPConfig` (text and vision) is read
    /// through its `text_config`.
    pub fn from_json(json: serde_json::Value) -> Result<Self> {
        let serde_json::Value::Object(mut map) = json else {
            return Err(Error::invalid("config is not a JSON object"));
        };
        if map.get("model_type").and_then(|m| m.as_str()) == Some("clip") {
            match map.remove("text_config") {
                Some(tc) => return Self::from_json(tc),
                None => return Err(Error::invalid("a `clip` config without `text_config`")),
            }
        }
        if let Some(t) = map.get("model_type").and_then(|m| m.as_str()) {
            if t != MODEL_TYPE {
                return Err(Error::invalid(format!(
                    "`model_type` is `{t}`, expected `{MODEL_TYPE}`"
                )));
            }
        }
        map.retain(|k, _| !BOOKKEEPING.contains(&k.as_str()));
        // transformers writes `null` for unset optional ids; serde's defaults cover the rest.
        if map.get("eos_token_id").is_some_and(|v| v.is_array()) {
            return Err(Error::invalid(
                "`eos_token_id` is a list; the CLIP text encoder pools at a single EOS id",
            ));
        }
        let cfg: Self = json_file::from_value(serde_json::Value::Object(map))
            .map_err(|e| Error::invalid(format!("CLIPTextConfig: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config.json transformers would write for this encoder.
    pub fn to_json(&self, with_projection: bool) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        let m = v.as_object_mut().expect("struct");
        let arch = if with_projection {
            "CLIPTextModelWithProjection"
        } else {
            "CLIPTextModel"
        };
        m.insert("architectures".into(), serde_json::json!([arch]));
        m.insert("model_type".into(), MODEL_TYPE.into());
        m.insert("transformers_version".into(), "5.23.0".into());
        v
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    pub fn activation(&self) -> Result<Activation> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            other => Err(Error::invalid(format!(
                "`hidden_act` `{other}` is not supported (quick_gelu, gelu, gelu_new, gelu_pytorch_tanh)"
            ))),
        }
    }

    /// transformers' legacy pooling rule (see [`ClipTextConfig::eos_token_id`]).
    pub fn legacy_pooling(&self) -> bool {
        self.eos_token_id == 2
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v <= 0 {
                return Err(Error::invalid(format!(
                    "`{name}` must be positive, got {v}"
                )));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::invalid(format!(
                "`hidden_size` {} is not a multiple of `num_attention_heads` {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if let Some(p) = self.projection_dim {
            if p <= 0 {
                return Err(Error::invalid(format!(
                    "`projection_dim` must be positive, got {p}"
                )));
            }
        }
        if self.layer_norm_eps.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return Err(Error::invalid(format!(
                "`layer_norm_eps` must be positive, got {}",
                self.layer_norm_eps
            )));
        }
        for (name, p) in [
            ("attention_dropout", self.attention_dropout),
            ("dropout", self.dropout),
        ] {
            if p != 0.0 {
                return Err(Error::invalid(format!(
                    "`{name}` is {p}: dropout is not implemented in this text encoder"
                )));
            }
        }
        if !(0..self.vocab_size).contains(&self.eos_token_id) {
            return Err(Error::invalid(format!(
                "`eos_token_id` {} is outside the vocabulary (size {})",
                self.eos_token_id, self.vocab_size
            )));
        }
        self.activation()?;
        Ok(())
    }
}
