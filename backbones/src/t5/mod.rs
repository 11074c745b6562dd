//! transformers' `T5EncoderModel` (the SD3 / Flux `text_encoder_3`) with its weight names, and
//! the T5 tokenizer as diffusers calls it.
//!
//! Runs in fp32 or bf16. fp16 is refused: T5 v1.1's activations exceed fp16's range (transformers
//! clamps them to keep going; the outputs are then not the model's).
pub mod config;
pub mod model;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use softalign_core::tensors::{save_safetensors, write_atomic};
use softalign_core::{Error, Result};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

pub use config::{T5Activation, T5Config};
pub use model::{T5EncoderOutput, T5Stack};
pub use tokenizer::T5Tokenizer;

use crate::clip::InitMode;
use crate::weights::{load_strict_opened, open_all, weight_files, AllowList};

/// The tied input embedding: transformers saves it as `shared.weight`; some converted
/// checkpoints also (or only) hold `encoder.embed_tokens.weight`.
pub const SHARED: &str = "shared.weight";
pub const EMBED_TOKENS: &str = "encoder.embed_tokens.weight";

/// `T5EncoderModel`: `shared` (the token embedding) and the `encoder` stack.
pub struct T5Encoder {
    vs: nn::VarStore,
    config: T5Config,
    shared: nn::Embedding,
    encoder: T5Stack,
}

impl std::fmt::Debug for T5Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Encoder")
            .field("config", &self.config)
            .finish()
    }
}

/// Refuses the dtypes the encoder cannot run in.
pub fn check_kind(kind: Kind) -> Result<()> {
    match kind {
        Kind::Float | Kind::BFloat16 | Kind::Double => Ok(()),
        Kind::Half => Err(Error::invalid(
            "the T5 encoder does not run in fp16: its activations overflow fp16's range \
             (use f32 or bf16)",
        )),
        other => Err(Error::invalid(format!(
            "the T5 encoder runs in f32 or bf16, not {other:?}"
        ))),
    }
}

impl T5Encoder {
    fn build(config: &T5Config, embed_path: &str, device: Device, init: InitMode) -> Result<Self> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let mut p = root.clone();
        for seg in embed_path.trim_end_matches(".weight").split('.') {
            p = &p / seg;
        }
        // transformers: normal(std = initializer_factor * 1.0).
        let shared = nn::embedding(
            p,
            config.vocab_size,
            config.d_model,
            nn::EmbeddingConfig {
                ws_init: match init {
                    InitMode::Random => nn::Init::Randn {
                        mean: 0.0,
                        stdev: 1.0,
                    },
                    InitMode::Placeholder => nn::Init::Const(0.0),
                },
                ..Default::default()
            },
        );
        let encoder = T5Stack::new(&root / "encoder", config, init)?;
        Ok(Self {
            vs,
            config: config.clone(),
            shared,
            encoder,
        })
    }

    /// A freshly initialised encoder (seed with `tch::manual_seed`), in fp32.
    pub fn random(config: &T5Config, device: Device) -> Result<Self> {
        Self::build(config, SHARED, device, InitMode::Random)
    }

    /// Loads a transformers folder: config.json plus model.safetensors (or its sharded index,
    /// or a pytorch_model.bin pickle).
    pub fn load(dir: impl AsRef<Path>, device: Device, kind: Kind) -> Result<Self> {
        let dir = dir.as_ref();
        let config = T5Config::from_file(&dir.join("config.json"))?;
        let files = weight_files(dir, "model")?;
        Self::load_files(&config, &files, device, kind)
    }

    /// Loads weight files (safetensors or pickles) into an encoder built from `config`; every
    /// tensor must be used (a decoder's tensors are refused) and every variable filled.
    pub fn load_files(
        config: &T5Config,
        files: &[PathBuf],
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        check_kind(kind)?;
        let opened = open_all(files)?;
        let names: Vec<String> = opened.iter().flat_map(|f| f.names()).collect();
        let has = |n: &str| names.iter().any(|x| x == n);
        let mut allow = AllowList::default();
        let embed = match (has(SHARED), has(EMBED_TOKENS)) {
            (true, true) => {
                // Tied: the second copy is the same tensor.
                allow.unused.push(EMBED_TOKENS.into());
                SHARED
            }
            (true, false) => SHARED,
            (false, true) => EMBED_TOKENS,
            (false, false) => {
                let shown: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                return Err(Error::invalid(format!(
                    "{}: neither `{SHARED}` nor `{EMBED_TOKENS}`; not a T5 encoder checkpoint",
                    shown.join(", ")
                )));
            }
        };
        let mut enc = Self::build(config, embed, device, InitMode::Placeholder)?;
        enc.vs.set_kind(kind);
        load_strict_opened(&enc.vs, &opened, &allow)?;
        Ok(enc)
    }

    /// Runs the encoder on ids [B, T] (any length: the position bias is relative). diffusers'
    /// SD3 pipeline passes no attention mask.
    pub fn encode(&self, input_ids: &Tensor) -> Result<T5EncoderOutput> {
        self.encode_masked(input_ids, None)
    }

    /// As [`Self::encode`], with a padding mask [B, T] (nonzero = token).
    pub fn encode_masked(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<T5EncoderOutput> {
        let ids = self.check_ids(input_ids)?;
        let embeds = self.shared.forward(&ids);
        self.encoder.forward(&embeds, attention_mask)
    }

    fn check_ids(&self, input_ids: &Tensor) -> Result<Tensor> {
        let size = input_ids.size();
        if size.len() != 2 || size[1] == 0 {
            return Err(Error::tensor(
                "input_ids",
                format!("shape {size:?}, expected [batch, tokens]"),
            ));
        }
        if input_ids.is_floating_point() {
            return Err(Error::tensor("input_ids", "must hold integer ids"));
        }
        let ids = input_ids
            .to_device(self.shared.ws.device())
            .to_kind(Kind::Int64);
        let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if lo < 0 || hi >= self.config.vocab_size {
            return Err(Error::tensor(
                "input_ids",
                format!(
                    "ids range over [{lo}, {hi}], outside the vocabulary [0, {})",
                    self.config.vocab_size
                ),
            ));
        }
        Ok(ids)
    }

    /// Writes config.json and model.safetensors (`shared.weight` + `encoder.*`), in the
    /// current dtype.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        let c = &self.config;
        let json = serde_json::json!({
            "architectures": ["T5EncoderModel"],
            "model_type": config::MODEL_TYPE,
            "vocab_size": c.vocab_size,
            "d_model": c.d_model,
            "d_kv": c.d_kv,
            "d_ff": c.d_ff,
            "num_layers": c.num_layers,
            "num_heads": c.num_heads,
            "relative_attention_num_buckets": c.relative_attention_num_buckets,
            "relative_attention_max_distance": c.relative_attention_max_distance,
            "layer_norm_epsilon": c.layer_norm_epsilon,
            "feed_forward_proj": c.feed_forward_proj,
            "is_decoder": false,
            "is_encoder_decoder": false,
            "pad_token_id": c.pad_token_id,
            "dropout_rate": 0.0,
        });
        let text = serde_json::to_string_pretty(&json).expect("config serialises");
        write_atomic(&dir.join("config.json"), text.as_bytes())?;
        let mut tensors: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| {
                if n == EMBED_TOKENS {
                    (SHARED.into(), t)
                } else {
                    (n, t)
                }
            })
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        save_safetensors(dir.join("model.safetensors"), &tensors, &meta)
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    pub fn vs(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }
}
