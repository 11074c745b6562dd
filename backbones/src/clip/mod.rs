//! The CLIP text encoder with transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`
//! architecture and weight names, and its tokenizer.
//!
//! Checkpoint layouts: transformers 4.x (every released SD `text_encoder*`) and transformers 5's
//! `CLIPTextModelWithProjection` prefix the tower with `text_model.`; transformers 5's plain
//! `CLIPTextModel` saves it without. Both load; [`TextEncoder::save_pretrained`] always writes
//! the prefixed layout, which both transformers generations read.
pub mod config;
pub mod model;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use softalign_core::tensors::{save_safetensors, write_atomic};
use softalign_core::{Error, Result};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

pub use config::{Activation, ClipTextConfig};
pub use model::{ClipTextTransformer, InitMode};
pub use tokenizer::ClipTokenizer;

use crate::weights::{load_strict_opened, open_all, weight_files, AllowList};

/// The module path transformers gives the text tower inside both model classes.
pub const TOWER_PREFIX: &str = "text_model";

/// Everything one forward pass yields.
#[derive(Debug)]
pub struct TextEncoderOutput {
    /// [B, T, D], after `final_layer_norm`.
    pub last_hidden_state: Tensor,
    /// The embeddings, then each layer's output before the final norm: `num_hidden_layers + 1`
    /// tensors [B, T, D], as transformers' `hidden_states`.
    pub hidden_states: Vec<Tensor>,
    /// [B, D]: `last_hidden_state` at the EOS position (transformers' `pooler_output`).
    pub pooled: Tensor,
    /// [B, projection_dim]: `text_projection(pooled)` for `CLIPTextModelWithProjection`.
    pub text_embeds: Option<Tensor>,
}

impl TextEncoderOutput {
    /// `hidden_states[-2]`, the penultimate layer's output without the final norm (what SDXL and
    /// SD3 condition on).
    pub fn penultimate(&self) -> &Tensor {
        &self.hidden_states[self.hidden_states.len() - 2]
    }
}

/// Every Linear layer of a transformers CLIP text model (`CLIPTextModel`, or
/// `CLIPTextModelWithProjection` when `with_projection`), by module path with (in, out).
pub fn linear_shapes(
    cfg: &ClipTextConfig,
    with_projection: bool,
) -> softalign_core::linear_site::LinearShapes {
    let d = cfg.hidden_size;
    let mut v = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("{TOWER_PREFIX}.encoder.layers.{l}");
        for a in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            v.push((format!("{p}.self_attn.{a}"), d, d));
        }
        v.push((format!("{p}.mlp.fc1"), d, cfg.intermediate_size));
        v.push((format!("{p}.mlp.fc2"), cfg.intermediate_size, d));
    }
    if let (true, Some(p)) = (with_projection, cfg.projection_dim) {
        v.push(("text_projection".to_string(), d, p));
    }
    v
}

/// A CLIP text encoder: the tower, and `text_projection` when the checkpoint has one.
pub struct TextEncoder {
    vs: nn::VarStore,
    config: ClipTextConfig,
    transformer: ClipTextTransformer,
    text_projection: Option<crate::linear::SiteLinear>,
    /// Whether the variable names start with `text_model.`.
    prefixed: bool,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder")
            .field("config", &self.config)
            .field("with_projection", &self.text_projection.is_some())
            .finish()
    }
}

impl TextEncoder {
    fn build(
        config: &ClipTextConfig,
        with_projection: bool,
        prefixed: bool,
        device: Device,
        init: InitMode,
    ) -> Result<Self> {
        config.validate()?;
        let projection_dim = match (with_projection, config.projection_dim) {
            (false, _) => None,
            (true, Some(p)) => Some(p),
            (true, None) => {
                return Err(Error::invalid(
                    "a text projection needs `projection_dim` in the config",
                ))
            }
        };
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let tower = if prefixed {
            &root / TOWER_PREFIX
        } else {
            root.clone()
        };
        let transformer = ClipTextTransformer::new(tower, config, init)?;
        // transformers: normal(std = hidden_size^-0.5 * initializer_factor), no bias.
        let std = (config.hidden_size as f64).powf(-0.5);
        let text_projection = projection_dim.map(|p| {
            model::linear(
                &root / "text_projection",
                config.hidden_size,
                p,
                false,
                std,
                init,
            )
        });
        Ok(Self {
            vs,
            config: config.clone(),
            transformer,
            text_projection,
            prefixed,
        })
    }

    /// A freshly initialised encoder (transformers' `_init_weights`; seed with
    /// `tch::manual_seed`), in fp32.
    pub fn random(config: &ClipTextConfig, with_projection: bool, device: Device) -> Result<Self> {
        Self::build(config, with_projection, true, device, InitMode::Random)
    }

    /// Loads a transformers folder: config.json plus model.safetensors (or its sharded index,
    /// or a pytorch_model.bin pickle).
    /// `kind` is the dtype the weights are kept in.
    pub fn load(dir: impl AsRef<Path>, device: Device, kind: Kind) -> Result<Self> {
        let dir = dir.as_ref();
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let files = weight_files(dir, "model")?;
        Self::load_files(&config, &files, device, kind)
    }

    /// Loads weight files (safetensors or torch pickles) into an encoder built from `config`.
    /// The layout (prefix or not) and the presence of `text_projection` are read from the
    /// files; every tensor must be used and every variable filled.
    pub fn load_files(
        config: &ClipTextConfig,
        files: &[PathBuf],
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let opened = open_all(files)?;
        let names: Vec<String> = opened.iter().flat_map(|f| f.names()).collect();
        let has = |n: &str| names.iter().any(|x| x == n);
        let prefixed = has(&format!("{TOWER_PREFIX}.embeddings.token_embedding.weight"));
        if !prefixed && !has("embeddings.token_embedding.weight") {
            let shown: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            return Err(Error::invalid(format!(
                "{}: no `{TOWER_PREFIX}.embeddings.token_embedding.weight` nor \
                 `embeddings.token_embedding.weight`; not a CLIP text encoder checkpoint",
                shown.join(", ")
            )));
        }
        let with_projection = has("text_projection.weight");
        let mut enc = Self::build(
            config,
            with_projection,
            prefixed,
            device,
            InitMode::Placeholder,
        )?;
        enc.vs.set_kind(kind);
        // transformers before 4.31 saved the position ids as a buffer (old pytorch_model.bin
        // files hold it); transformers itself ignores it on load.
        let allow = AllowList {
            unused: vec![
                format!("{TOWER_PREFIX}.embeddings.position_ids"),
                "embeddings.position_ids".into(),
            ],
            ..AllowList::default()
        };
        load_strict_opened(&enc.vs, &opened, &allow)?;
        Ok(enc)
    }

    /// Runs the encoder on ids [B, T] (T <= max_position_embeddings) with the causal mask only,
    /// as diffusers' pipelines call it.
    pub fn encode(&self, input_ids: &Tensor) -> Result<TextEncoderOutput> {
        self.encode_masked(input_ids, None)
    }

    /// As [`Self::encode`], with a padding mask [B, T] (nonzero = token) combined with the causal
    /// mask, as transformers does when given `attention_mask`.
    pub fn encode_masked(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<TextEncoderOutput> {
        let out = self.transformer.forward(input_ids, attention_mask)?;
        let text_embeds = self
            .text_projection
            .as_ref()
            .map(|p| p.forward(&out.pooled));
        Ok(TextEncoderOutput {
            last_hidden_state: out.last_hidden_state,
            hidden_states: out.hidden_states,
            pooled: out.pooled,
            text_embeds,
        })
    }

    /// Writes config.json and model.safetensors with transformers' names (prefixed with
    /// `text_model.`), in the current dtype.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        let config = self.config.to_json(self.text_projection.is_some());
        let text = serde_json::to_string_pretty(&config).expect("config serialises");
        write_atomic(&dir.join("config.json"), text.as_bytes())?;
        let tensors = self.named_tensors();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        save_safetensors(dir.join("model.safetensors"), &tensors, &meta)
    }

    /// The weights under the names save_pretrained writes, sorted.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| {
                let tower = !n.starts_with("text_projection.");
                let name = if tower && !self.prefixed {
                    format!("{TOWER_PREFIX}.{n}")
                } else {
                    n
                };
                (name, t)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    pub fn with_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    pub fn transformer(&self) -> &ClipTextTransformer {
        &self.transformer
    }

    /// The variables (to train, freeze or convert).
    pub fn vs(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn vs_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }
}
