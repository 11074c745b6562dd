//! transformers' T5 encoder stack (models/t5/modeling_t5.py): `T5LayerNorm`, `T5Attention`
//! with the relative position bias of the first block shared by all blocks, the (gated) dense
//! feed-forward, `T5Block` and `T5Stack`'s final norm. Variable paths are transformers' module
//! paths (`encoder.block.{i}.layer.{0,1}...`).
use softalign_core::{Error, Result};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::config::{T5Activation, T5Config};
use crate::clip::InitMode;

fn init_normal(init: InitMode, stdev: f64) -> nn::Init {
    match init {
        InitMode::Random => nn::Init::Randn { mean: 0.0, stdev },
        InitMode::Placeholder => nn::Init::Const(0.0),
    }
}

fn linear(
    p: nn::Path,
    d_in: i64,
    d_out: i64,
    std: f64,
    init: InitMode,
) -> crate::linear::SiteLinear {
    crate::linear::linear(
        p,
        d_in,
        d_out,
        nn::LinearConfig {
            ws_init: init_normal(init, std),
            bs_init: None,
            bias: false,
        },
    )
}

/// `T5LayerNorm`: RMS norm without bias or mean subtraction; the variance is taken in fp32.
#[derive(Debug)]
pub struct T5LayerNorm {
    pub weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: p.var("weight", &[dim], nn::Init::Const(1.0)),
            eps,
        }
    }
}

impl Module for T5LayerNorm {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let variance = xs
            .to_kind(Kind::Float)
            .pow_tensor_scalar(2)
            .mean_dim(-1, true, Kind::Float);
        // As transformers: the fp32 rsqrt promotes the product to fp32, which is cast back to a
        // half-precision weight's dtype before scaling.
        let h = xs * (variance + self.eps).rsqrt();
        let h = match self.weight.kind() {
            Kind::BFloat16 | Kind::Half => h.to_kind(self.weight.kind()),
            _ => h,
        };
        &self.weight * h
    }
}

/// transformers' `_relative_position_bucket` for the bidirectional encoder: [Q, K] int64.
pub fn relative_position_bucket(relative: &Tensor, num_buckets: i64, max_distance: i64) -> Tensor {
    let half = num_buckets / 2;
    let sign_part = relative.gt(0).to_kind(Kind::Int64) * half;
    let distance = relative.abs();
    let max_exact = half / 2;
    let is_small = distance.lt(max_exact);
    // Computed in fp32 and truncated toward zero, as the reference's `.float()` / `.to(long)`.
    let large = (distance.to_kind(Kind::Float) / max_exact as f64).log()
        / (max_distance as f64 / max_exact as f64).ln()
        * (half - max_exact) as f64;
    let large = large.to_kind(Kind::Int64) + max_exact;
    let large = large.clamp_max(half - 1);
    sign_part + distance.where_self(&is_small, &large)
}

/// `T5Attention` for self-attention: no biases, no 1/sqrt(d) scaling (folded into the weights).
#[derive(Debug)]
pub struct T5Attention {
    pub q: crate::linear::SiteLinear,
    pub k: crate::linear::SiteLinear,
    pub v: crate::linear::SiteLinear,
    pub o: crate::linear::SiteLinear,
    /// Only in block 0: [num_buckets, num_heads].
    pub relative_attention_bias: Option<nn::Embedding>,
    heads: i64,
    d_kv: i64,
    num_buckets: i64,
    max_distance: i64,
}

impl T5Attention {
    pub fn new(p: nn::Path, cfg: &T5Config, has_bias: bool, init: InitMode) -> Self {
        let (d, inner) = (cfg.d_model, cfg.inner_dim());
        // transformers' _init_weights (factor 1.0).
        let q_std = ((d * cfg.d_kv) as f64).powf(-0.5);
        let kv_std = (d as f64).powf(-0.5);
        let o_std = (inner as f64).powf(-0.5);
        let relative_attention_bias = has_bias.then(|| {
            nn::embedding(
                &p / "relative_attention_bias",
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
                nn::EmbeddingConfig {
                    ws_init: init_normal(init, kv_std),
                    ..Default::default()
                },
            )
        });
        Self {
            q: linear(&p / "q", d, inner, q_std, init),
            k: linear(&p / "k", d, inner, kv_std, init),
            v: linear(&p / "v", d, inner, kv_std, init),
            o: linear(&p / "o", inner, d, o_std, init),
            relative_attention_bias,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
        }
    }

    /// `compute_bias`: [1, heads, T, T] from the bucketed key - query offsets.
    pub fn compute_bias(&self, t: i64) -> Option<Tensor> {
        let table = self.relative_attention_bias.as_ref()?;
        let dev = table.ws.device();
        let pos = Tensor::arange(t, (Kind::Int64, dev));
        let relative = pos.view([1, t]) - pos.view([t, 1]);
        let buckets = relative_position_bucket(&relative, self.num_buckets, self.max_distance);
        Some(table.forward(&buckets).permute([2, 0, 1]).unsqueeze(0))
    }

    /// `bias`: position bias plus the additive padding mask, [B or 1, heads, T, T].
    pub fn forward(&self, xs: &Tensor, bias: &Tensor) -> Tensor {
        let (b, t, _) = xs.size3().expect("[B, T, D] checked by the encoder");
        let split = |x: Tensor| x.view([b, t, self.heads, self.d_kv]).transpose(1, 2);
        let q = split(self.q.forward(xs));
        let k = split(self.k.forward(xs));
        let v = split(self.v.forward(xs));
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(bias.to_kind(q.kind())),
            0.0,
            false,
            1.0,
            false,
        );
        let out = out
            .transpose(1, 2)
            .contiguous()
            .view([b, t, self.heads * self.d_kv]);
        self.o.forward(&out)
    }
}

/// `T5DenseGatedActDense` (`wi_0`, `wi_1`, `wo`) or `T5DenseActDense` (`wi`, `wo`).
#[derive(Debug)]
pub enum T5Dense {
    Gated {
        wi_0: crate::linear::SiteLinear,
        wi_1: crate::linear::SiteLinear,
        wo: crate::linear::SiteLinear,
        act: T5Activation,
    },
    Plain {
        wi: crate::linear::SiteLinear,
        wo: crate::linear::SiteLinear,
        act: T5Activation,
    },
}

fn activate(act: T5Activation, xs: &Tensor) -> Tensor {
    match act {
        T5Activation::Relu => xs.relu(),
        T5Activation::Gelu => xs.gelu("none"),
        T5Activation::GeluTanh => xs.gelu("tanh"),
        T5Activation::Silu => xs.silu(),
    }
}

impl T5Dense {
    pub fn new(p: nn::Path, cfg: &T5Config, init: InitMode) -> Result<Self> {
        let act = cfg.activation()?;
        let in_std = (cfg.d_model as f64).powf(-0.5);
        let out_std = (cfg.d_ff as f64).powf(-0.5);
        Ok(if cfg.is_gated() {
            T5Dense::Gated {
                wi_0: linear(&p / "wi_0", cfg.d_model, cfg.d_ff, in_std, init),
                wi_1: linear(&p / "wi_1", cfg.d_model, cfg.d_ff, in_std, init),
                wo: linear(&p / "wo", cfg.d_ff, cfg.d_model, out_std, init),
                act,
            }
        } else {
            T5Dense::Plain {
                wi: linear(&p / "wi", cfg.d_model, cfg.d_ff, in_std, init),
                wo: linear(&p / "wo", cfg.d_ff, cfg.d_model, out_std, init),
                act,
            }
        })
    }
}

impl Module for T5Dense {
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            T5Dense::Gated {
                wi_0,
                wi_1,
                wo,
                act,
            } => wo.forward(&(activate(*act, &wi_0.forward(xs)) * wi_1.forward(xs))),
            T5Dense::Plain { wi, wo, act } => wo.forward(&activate(*act, &wi.forward(xs))),
        }
    }
}

/// `T5Block` of the encoder: `layer.0` (self-attention) and `layer.1` (feed-forward), each
/// pre-normed with a residual.
#[derive(Debug)]
pub struct T5Block {
    pub self_attention: T5Attention,
    pub attention_norm: T5LayerNorm,
    pub dense: T5Dense,
    pub ff_norm: T5LayerNorm,
}

impl T5Block {
    pub fn new(p: nn::Path, cfg: &T5Config, first: bool, init: InitMode) -> Result<Self> {
        let l0 = &p / "layer" / 0;
        let l1 = &p / "layer" / 1;
        Ok(Self {
            self_attention: T5Attention::new(&l0 / "SelfAttention", cfg, first, init),
            attention_norm: T5LayerNorm::new(
                &l0 / "layer_norm",
                cfg.d_model,
                cfg.layer_norm_epsilon,
            ),
            dense: T5Dense::new(&l1 / "DenseReluDense", cfg, init)?,
            ff_norm: T5LayerNorm::new(&l1 / "layer_norm", cfg.d_model, cfg.layer_norm_epsilon),
        })
    }

    pub fn forward(&self, xs: &Tensor, bias: &Tensor) -> Tensor {
        let xs = xs
            + self
                .self_attention
                .forward(&self.attention_norm.forward(xs), bias);
        &xs + self.dense.forward(&self.ff_norm.forward(&xs))
    }
}

/// What the encoder computes.
#[derive(Debug)]
pub struct T5EncoderOutput {
    /// [B, T, d_model], after `final_layer_norm`.
    pub last_hidden_state: Tensor,
    /// As transformers' `hidden_states`: the embeddings, the outputs of blocks 0..L-2, then
    /// `last_hidden_state` (transformers records the last block after the final norm):
    /// `num_layers + 1` tensors.
    pub hidden_states: Vec<Tensor>,
}

/// `T5Stack` as the encoder: `embed_tokens` (tied to `shared`), `block.{i}`, `final_layer_norm`.
#[derive(Debug)]
pub struct T5Stack {
    pub blocks: Vec<T5Block>,
    pub final_layer_norm: T5LayerNorm,
}

impl T5Stack {
    pub fn new(p: nn::Path, cfg: &T5Config, init: InitMode) -> Result<Self> {
        let blocks = (0..cfg.num_layers)
            .map(|i| T5Block::new(&p / "block" / i, cfg, i == 0, init))
            .collect::<Result<_>>()?;
        Ok(Self {
            blocks,
            final_layer_norm: T5LayerNorm::new(
                &p / "final_layer_norm",
                cfg.d_model,
                cfg.layer_norm_epsilon,
            ),
        })
    }

    /// `embeds` [B, T, D]; `attention_mask` [B, T] (nonzero = token) or None.
    pub fn forward(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<T5EncoderOutput> {
        let (b, t, _) = embeds
            .size3()
            .map_err(|e| Error::tensor("inputs_embeds", e))?;
        let position = self.blocks[0]
            .self_attention
            .compute_bias(t)
            .expect("block 0 holds the relative attention bias");
        let bias = match attention_mask {
            None => position,
            Some(m) => {
                if m.size() != [b, t] {
                    return Err(Error::tensor(
                        "attention_mask",
                        format!("shape {:?}, expected [{b}, {t}]", m.size()),
                    ));
                }
                // transformers' additive mask: the dtype's lowest value where masked.
                let lowest = match position.kind() {
                    Kind::BFloat16 => -3.3895313892515355e38,
                    _ => f32::MIN as f64,
                };
                let masked = m.to_device(embeds.device()).eq(0).view([b, 1, 1, t]);
                let add = Tensor::zeros([b, 1, 1, t], (position.kind(), embeds.device()))
                    .masked_fill(&masked, lowest);
                position + add
            }
        };
        let mut hidden_states = Vec::with_capacity(self.blocks.len() + 1);
        let mut xs = embeds.shallow_clone();
        for block in &self.blocks {
            let next = block.forward(&xs, &bias);
            hidden_states.push(xs);
            xs = next;
        }
        let last_hidden_state = self.final_layer_norm.forward(&xs);
        hidden_states.push(last_hidden_state.shallow_clone());
        Ok(T5EncoderOutput {
            last_hidden_state,
            hidden_states,
        })
    }
}
