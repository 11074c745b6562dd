//! diffusers `models/attention.py` `BasicTransformerBlock` (layer norms, self-attention
//! `attn1`, cross-attention `attn2`, GEGLU feed-forward) and `attention_processor.py`
//! `Attention` without biases on q/k/v (`attention_bias=False`), as the SD UNets use them.
use tch::nn::{self, Module};
use tch::Tensor;

fn linear(p: nn::Path, i: i64, o: i64, bias: bool) -> crate::linear::SiteLinear {
    crate::linear::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            bias,
            ..Default::default()
        },
    )
}

/// `Attention(query_dim, cross_attention_dim, heads, dim_head, bias=False, out_bias=True)`.
#[derive(Debug)]
pub struct Attention {
    heads: i64,
    head_dim: i64,
    to_q: crate::linear::SiteLinear,
    to_k: crate::linear::SiteLinear,
    to_v: crate::linear::SiteLinear,
    to_out: crate::linear::SiteLinear,
}

impl Attention {
    /// `context_dim`: the key/value input width (the query width for self-attention).
    pub fn new(p: nn::Path, query_dim: i64, context_dim: i64, heads: i64, head_dim: i64) -> Self {
        let inner = heads * head_dim;
        Self {
            heads,
            head_dim,
            to_q: linear(&p / "to_q", query_dim, inner, false),
            to_k: linear(&p / "to_k", context_dim, inner, false),
            to_v: linear(&p / "to_v", context_dim, inner, false),
            to_out: linear(&p / "to_out" / 0, inner, query_dim, true),
        }
    }

    fn split(&self, x: &Tensor) -> Tensor {
        let b = x.size()[0];
        x.view([b, -1, self.heads, self.head_dim]).transpose(1, 2)
    }

    /// `AttnProcessor2_0`: scaled dot-product attention of `x` over `context` (itself when None).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let b = x.size()[0];
        let c = context.unwrap_or(x);
        let q = self.split(&self.to_q.forward(x));
        let k = self.split(&self.to_k.forward(c));
        let v = self.split(&self.to_v.forward(c));
        let h = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        )
        .transpose(1, 2)
        .reshape([b, -1, self.heads * self.head_dim])
        .to_kind(q.kind());
        self.to_out.forward(&h)
    }
}

/// `FeedForward(dim, activation_fn="geglu")`: `net.0.proj` to 2 x 4 dim, hidden * gelu(gate)
/// (exact GELU), `net.2` back to dim.
#[derive(Debug)]
pub struct FeedForward {
    proj: crate::linear::SiteLinear,
    out: crate::linear::SiteLinear,
}

impl FeedForward {
    pub fn new(p: nn::Path, dim: i64) -> Self {
        let net = &p / "net";
        let inner = 4 * dim;
        Self {
            proj: linear(&net / 0 / "proj", dim, 2 * inner, true),
            out: linear(&net / 2, inner, dim, true),
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let hg = self.proj.forward(x).chunk(2, -1);
        self.out.forward(&(&hg[0] * hg[1].gelu("none")))
    }
}

fn layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    let cfg = nn::LayerNormConfig {
        eps,
        ..Default::default()
    };
    nn::layer_norm(p, vec![dim], cfg)
}

/// `BasicTransformerBlock(norm_type="layer_norm")`: pre-norm self-attention, cross-attention
/// over the text context, feed-forward, each with a residual.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm2: nn::LayerNorm,
    attn2: Attention,
    norm3: nn::LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(p: nn::Path, dim: i64, heads: i64, head_dim: i64, cross_dim: i64) -> Self {
        // Transformer2DModel's default norm_eps.
        let eps = 1e-5;
        Self {
            norm1: layer_norm(&p / "norm1", dim, eps),
            attn1: Attention::new(&p / "attn1", dim, dim, heads, head_dim),
            norm2: layer_norm(&p / "norm2", dim, eps),
            attn2: Attention::new(&p / "attn2", dim, cross_dim, heads, head_dim),
            norm3: layer_norm(&p / "norm3", dim, eps),
            ff: FeedForward::new(&p / "ff", dim),
        }
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let x = self.attn1.forward(&self.norm1.forward(x), None) + x;
        let x = self.attn2.forward(&self.norm2.forward(&x), Some(context)) + x;
        self.ff.forward(&self.norm3.forward(&x)) + x
    }
}
