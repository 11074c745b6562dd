//! diffusers `JointTransformerBlock` (models/attention.py): the MMDiT block, with SD3.5's
//! dual attention and the `context_pre_only` last block.
use tch::nn;
use tch::Tensor;

use super::attention::{Attention, AttentionConfig, FeedForward};
use super::normalization::{
    layer_norm, AdaLayerNormContinuous, AdaLayerNormZero, Sd35AdaLayerNormZeroX,
};

#[derive(Debug)]
enum Norm1 {
    Zero(AdaLayerNormZero),
    ZeroX(Sd35AdaLayerNormZeroX),
}

/// The context side; absent parts belong to the last (`context_pre_only`) block.
#[derive(Debug)]
enum ContextPath {
    Full {
        norm1_context: AdaLayerNormZero,
        ff_context: FeedForward,
    },
    PreOnly {
        norm1_context: AdaLayerNormContinuous,
    },
}

#[derive(Debug)]
pub struct JointTransformerBlock {
    norm1: Norm1,
    context: ContextPath,
    attn: Attention,
    attn2: Option<Attention>,
    ff: FeedForward,
}

pub struct BlockConfig {
    pub dim: i64,
    pub heads: i64,
    pub head_dim: i64,
    pub context_pre_only: bool,
    pub qk_norm: bool,
    pub dual_attention: bool,
}

fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    x * (scale.unsqueeze(1) + 1) + shift.unsqueeze(1)
}

impl JointTransformerBlock {
    pub fn new(p: nn::Path, c: &BlockConfig) -> Self {
        let norm1 = if c.dual_attention {
            Norm1::ZeroX(Sd35AdaLayerNormZeroX::new(&p / "norm1", c.dim))
        } else {
            Norm1::Zero(AdaLayerNormZero::new(&p / "norm1", c.dim))
        };
        let context = if c.context_pre_only {
            ContextPath::PreOnly {
                norm1_context: AdaLayerNormContinuous::new(
                    &p / "norm1_context",
                    c.dim,
                    c.dim,
                    1e-6,
                ),
            }
        } else {
            ContextPath::Full {
                norm1_context: AdaLayerNormZero::new(&p / "norm1_context", c.dim),
                ff_context: FeedForward::new(&p / "ff_context", c.dim),
            }
        };
        let attn_cfg = |joint| AttentionConfig {
            dim: c.dim,
            heads: c.heads,
            head_dim: c.head_dim,
            qk_norm: c.qk_norm,
            joint,
        };
        Self {
            norm1,
            context,
            attn: Attention::new(&p / "attn", &attn_cfg(Some(c.context_pre_only))),
            attn2: c
                .dual_attention
                .then(|| Attention::new(&p / "attn2", &attn_cfg(None))),
            ff: FeedForward::new(&p / "ff", c.dim),
        }
    }

    pub fn context_pre_only(&self) -> bool {
        matches!(self.context, ContextPath::PreOnly { .. })
    }

    /// Returns (context, image); the context is `None` after a `context_pre_only` block.
    pub fn forward(&self, x: &Tensor, context: &Tensor, temb: &Tensor) -> (Option<Tensor>, Tensor) {
        let (m, dual) = match &self.norm1 {
            Norm1::Zero(n) => (n.forward(x, temb), None),
            Norm1::ZeroX(n) => {
                let (m, x2, g2) = n.forward(x, temb);
                (m, Some((x2, g2)))
            }
        };
        let (norm_ctx, ctx_mod) = match &self.context {
            ContextPath::PreOnly { norm1_context } => (norm1_context.forward(context, temb), None),
            ContextPath::Full { norm1_context, .. } => {
                let cm = norm1_context.forward(context, temb);
                (cm.x.shallow_clone(), Some(cm))
            }
        };
        let (attn_out, ctx_attn_out) = self.attn.forward(&m.x, Some(&norm_ctx));
        let mut x = x + m.gate_msa.unsqueeze(1) * attn_out;
        if let (Some(attn2), Some((x2, g2))) = (&self.attn2, dual) {
            let (a2, _) = attn2.forward(&x2, None);
            x = &x + g2.unsqueeze(1) * a2;
        }
        let ff_in = modulate(&layer_norm(&x, 1e-6), &m.shift_mlp, &m.scale_mlp);
        let x = &x + m.gate_mlp.unsqueeze(1) * self.ff.forward(&ff_in);

        let ctx = match (&self.context, ctx_mod, ctx_attn_out) {
            (ContextPath::Full { ff_context, .. }, Some(cm), Some(ca)) => {
                let c = context + cm.gate_msa.unsqueeze(1) * ca;
                let ff_in = modulate(&layer_norm(&c, 1e-6), &cm.shift_mlp, &cm.scale_mlp);
                Some(&c + cm.gate_mlp.unsqueeze(1) * ff_context.forward(&ff_in))
            }
            _ => None,
        };
        (ctx, x)
    }
}
