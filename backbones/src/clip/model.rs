//! transformers' CLIP text tower (models/clip/modeling_clip.py): `CLIPTextEmbeddings`,
//! `CLIPAttention`, `CLIPMLP`, `CLIPEncoderLayer` and the text transformer with its final layer
//! norm. Variable paths are the module paths transformers uses, so the weight names of a
//! checkpoint are the names of this model's variables.
use softalign_core::{Error, Result};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::config::{Activation, ClipTextConfig};

/// How fresh variables are filled: transformers' `_init_weights` (a model to train), or a cheap
/// constant for variables a checkpoint overwrites right away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitMode {
    Random,
    Placeholder,
}

impl InitMode {
    fn normal(self, stdev: f64) -> nn::Init {
        match self {
            InitMode::Random => nn::Init::Randn { mean: 0.0, stdev },
            InitMode::Placeholder => nn::Init::Const(0.0),
        }
    }
}

pub(crate) fn linear(
    p: nn::Path,
    d_in: i64,
    d_out: i64,
    bias: bool,
    std: f64,
    init: InitMode,
) -> crate::linear::SiteLinear {
    let cfg = nn::LinearConfig {
        ws_init: init.normal(std),
        bs_init: bias.then_some(nn::Init::Const(0.0)),
        bias,
    };
    crate::linear::linear(p, d_in, d_out, cfg)
}

fn layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    let cfg = nn::LayerNormConfig {
        eps,
        ..Default::default()
    };
    nn::layer_norm(p, vec![dim], cfg)
}

fn embedding(p: nn::Path, n: i64, dim: i64, std: f64, init: InitMode) -> nn::Embedding {
    let cfg = nn::EmbeddingConfig {
        ws_init: init.normal(std),
        ..Default::default()
    };
    nn::embedding(p, n, dim, cfg)
}

/// `CLIPTextEmbeddings`: token embedding plus learned absolute positions.
#[derive(Debug)]
pub struct ClipTextEmbeddings {
    pub token_embedding: nn::Embedding,
    pub position_embedding: nn::Embedding,
}

impl ClipTextEmbeddings {
    pub fn new(p: nn::Path, cfg: &ClipTextConfig, init: InitMode) -> Self {
        // transformers: normal(std = 0.02 * initializer_factor) for both tables.
        Self {
            token_embedding: embedding(
                &p / "token_embedding",
                cfg.vocab_size,
                cfg.hidden_size,
                0.02,
                init,
            ),
            position_embedding: embedding(
                &p / "position_embedding",
                cfg.max_position_embeddings,
                cfg.hidden_size,
                0.02,
                init,
            ),
        }
    }

    /// `input_ids`: [B, T] int64 with T <= max_position_embeddings (checked by the caller).
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        let t = input_ids.size()[1];
        let positions = Tensor::arange(t, (Kind::Int64, input_ids.device()));
        self.token_embedding.forward(input_ids) + self.position_embedding.forward(&positions)
    }
}

/// `CLIPAttention` (bias on all four projections, scale head_dim^-0.5).
#[derive(Debug)]
pub struct ClipAttention {
    pub q_proj: crate::linear::SiteLinear,
    pub k_proj: crate::linear::SiteLinear,
    pub v_proj: crate::linear::SiteLinear,
    pub out_proj: crate::linear::SiteLinear,
    heads: i64,
    head_dim: i64,
}

impl ClipAttention {
    pub fn new(p: nn::Path, cfg: &ClipTextConfig, init: InitMode) -> Self {
        let d = cfg.hidden_size;
        let in_std = (d as f64).powf(-0.5) * ((2 * cfg.num_hidden_layers) as f64).powf(-0.5);
        let out_std = (d as f64).powf(-0.5);
        Self {
            q_proj: linear(&p / "q_proj", d, d, true, in_std, init),
            k_proj: linear(&p / "k_proj", d, d, true, in_std, init),
            v_proj: linear(&p / "v_proj", d, d, true, in_std, init),
            out_proj: linear(&p / "out_proj", d, d, true, out_std, init),
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        }
    }

    /// `mask`: boolean [B, 1, T, T] (true = may attend), or None for a plain causal mask.
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b, t, d) = xs.size3().expect("[B, T, D] checked by the encoder");
        let split = |x: Tensor| {
            x.view([b, t, self.heads, self.head_dim])
                .transpose(1, 2)
                .contiguous()
        };
        let q = split(self.q_proj.forward(xs));
        let k = split(self.k_proj.forward(xs));
        let v = split(self.v_proj.forward(xs));
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask,
            0.0,
            mask.is_none(),
            scale,
            false,
        );
        let out = out.transpose(1, 2).contiguous().view([b, t, d]);
        self.out_proj.forward(&out)
    }
}

fn activate(act: Activation, xs: &Tensor) -> Tensor {
    match act {
        Activation::QuickGelu => xs * (xs * 1.702).sigmoid(),
        Activation::Gelu => xs.gelu("none"),
        Activation::GeluTanh => xs.gelu("tanh"),
    }
}

/// `CLIPMLP`: fc1 -> activation -> fc2.
#[derive(Debug)]
pub struct ClipMlp {
    pub fc1: crate::linear::SiteLinear,
    pub fc2: crate::linear::SiteLinear,
    act: Activation,
}

impl ClipMlp {
    pub fn new(p: nn::Path, cfg: &ClipTextConfig, act: Activation, init: InitMode) -> Self {
        let d = cfg.hidden_size;
        let fc1_std = ((2 * d) as f64).powf(-0.5);
        let fc2_std = (d as f64).powf(-0.5) * ((2 * cfg.num_hidden_layers) as f64).powf(-0.5);
        Self {
            fc1: linear(&p / "fc1", d, cfg.intermediate_size, true, fc1_std, init),
            fc2: linear(&p / "fc2", cfg.intermediate_size, d, true, fc2_std, init),
            act,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.fc2.forward(&activate(self.act, &self.fc1.forward(xs)))
    }
}

/// `CLIPEncoderLayer`: pre-norm attention and MLP, each with a residual.
#[derive(Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: nn::LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: nn::LayerNorm,
}

impl ClipEncoderLayer {
    pub fn new(p: nn::Path, cfg: &ClipTextConfig, act: Activation, init: InitMode) -> Self {
        Self {
            self_attn: ClipAttention::new(&p / "self_attn", cfg, init),
            layer_norm1: layer_norm(&p / "layer_norm1", cfg.hidden_size, cfg.layer_norm_eps),
            mlp: ClipMlp::new(&p / "mlp", cfg, act, init),
            layer_norm2: layer_norm(&p / "layer_norm2", cfg.hidden_size, cfg.layer_norm_eps),
        }
    }

    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let xs = xs + self.self_attn.forward(&self.layer_norm1.forward(xs), mask);
        &xs + self.mlp.forward(&self.layer_norm2.forward(&xs))
    }
}

/// What the text transformer computes for one batch.
#[derive(Debug)]
pub struct TransformerOutput {
    /// After `final_layer_norm`.
    pub last_hidden_state: Tensor,
    /// The embeddings, then the output of every encoder layer (before the final norm), as
    /// transformers' `hidden_states` with `output_hidden_states=True`.
    pub hidden_states: Vec<Tensor>,
    /// `last_hidden_state` at each sequence's EOS position.
    pub pooled: Tensor,
}

/// `CLIPTextModel` (transformers 4's `CLIPTextTransformer`): embeddings, `encoder.layers`,
/// `final_layer_norm` and EOS pooling.
#[derive(Debug)]
pub struct ClipTextTransformer {
    pub embeddings: ClipTextEmbeddings,
    pub layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: nn::LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextTransformer {
    pub fn new(p: nn::Path, cfg: &ClipTextConfig, init: InitMode) -> Result<Self> {
        cfg.validate()?;
        let act = cfg.activation()?;
        let layers_p = &p / "encoder" / "layers";
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(&layers_p / i, cfg, act, init))
            .collect();
        Ok(Self {
            embeddings: ClipTextEmbeddings::new(&p / "embeddings", cfg, init),
            layers,
            final_layer_norm: layer_norm(
                &p / "final_layer_norm",
                cfg.hidden_size,
                cfg.layer_norm_eps,
            ),
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `input_ids` [B, T] (any integer kind); `attention_mask` [B, T] (nonzero = real token),
    /// combined with the causal mask as transformers does.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<TransformerOutput> {
        let ids = self.check_ids(input_ids)?;
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let mask = match attention_mask {
            None => None,
            Some(m) => {
                if m.size() != [b, t] {
                    return Err(Error::tensor(
                        "attention_mask",
                        format!("shape {:?}, expected [{b}, {t}]", m.size()),
                    ));
                }
                let keys = m.to_device(ids.device()).ne(0).view([b, 1, 1, t]);
                let causal = Tensor::ones([t, t], (Kind::Bool, ids.device())).tril(0);
                Some(keys.logical_and(&causal.view([1, 1, t, t])))
            }
        };
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        let mut xs = self.embeddings.forward(&ids);
        for layer in &self.layers {
            let next = layer.forward(&xs, mask.as_ref());
            hidden_states.push(xs);
            xs = next;
        }
        hidden_states.push(xs.shallow_clone());
        let last_hidden_state = self.final_layer_norm.forward(&xs);
        let pos = self.eos_positions(&ids)?;
        let d = last_hidden_state.size()[2];
        let pooled = last_hidden_state
            .gather(1, &pos.view([b, 1, 1]).expand([b, 1, d], false), false)
            .squeeze_dim(1);
        Ok(TransformerOutput {
            last_hidden_state,
            hidden_states,
            pooled,
        })
    }

    fn check_ids(&self, input_ids: &Tensor) -> Result<Tensor> {
        let size = input_ids.size();
        if size.len() != 2 || size[1] == 0 {
            return Err(Error::tensor(
                "input_ids",
                format!("shape {size:?}, expected [batch, tokens]"),
            ));
        }
        if size[1] > self.config.max_position_embeddings {
            return Err(Error::tensor(
                "input_ids",
                format!(
                    "{} tokens, more than max_position_embeddings = {}",
                    size[1], self.config.max_position_embeddings
                ),
            ));
        }
        if input_ids.is_floating_point() {
            return Err(Error::tensor("input_ids", "must hold integer ids"));
        }
        let ids = input_ids.to_device(self.embeddings.token_embedding.ws.device());
        let ids = ids.to_kind(Kind::Int64);
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

    /// transformers' pooling positions: with the legacy `eos_token_id == 2` the position of the
    /// largest id, else the first position holding `eos_token_id`.
    fn eos_positions(&self, ids: &Tensor) -> Result<Tensor> {
        if self.config.legacy_pooling() {
            return Ok(ids.argmax(-1, false));
        }
        let is_eos = ids.eq(self.config.eos_token_id);
        let missing = is_eos.any_dim(-1, false).logical_not();
        if missing.any().int64_value(&[]) != 0 {
            let rows: Vec<i64> = Vec::<i64>::try_from(missing.nonzero().view([-1]))
                .map_err(|e| Error::tensor("input_ids", e))?;
            return Err(Error::tensor(
                "input_ids",
                format!(
                    "row(s) {rows:?} hold no eos_token_id {}; CLIP pools the hidden state at EOS",
                    self.config.eos_token_id
                ),
            ));
        }
        Ok(is_eos.to_kind(Kind::Int).argmax(-1, false))
    }
}
