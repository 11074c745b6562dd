//! diffusers `Attention` with `JointAttnProcessor2_0` (the MMDiT joint attention, SD3.5's
//! qk-norm, the image-only `attn2`) and `FeedForward(activation_fn="gelu-approximate")`.
use tch::nn::{self, Module};
use tch::Tensor;

use super::normalization::RmsNorm;

fn linear(p: nn::Path, i: i64, o: i64) -> crate::linear::SiteLinear {
    crate::linear::linear(p, i, o, Default::default())
}

/// The context side of a joint attention (`added_kv_proj_dim = dim`).
#[derive(Debug)]
struct Added {
    add_q_proj: crate::linear::SiteLinear,
    add_k_proj: crate::linear::SiteLinear,
    add_v_proj: crate::linear::SiteLinear,
    /// Absent in the last block (`context_pre_only`): its context output is discarded.
    to_add_out: Option<crate::linear::SiteLinear>,
    norm_added_q: Option<RmsNorm>,
    norm_added_k: Option<RmsNorm>,
}

#[derive(Debug)]
pub struct Attention {
    heads: i64,
    head_dim: i64,
    to_q: crate::linear::SiteLinear,
    to_k: crate::linear::SiteLinear,
    to_v: crate::linear::SiteLinear,
    to_out: crate::linear::SiteLinear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    added: Option<Added>,
}

/// How an [`Attention`] is built.
pub struct AttentionConfig {
    pub dim: i64,
    pub heads: i64,
    pub head_dim: i64,
    pub qk_norm: bool,
    /// `Some(context_pre_only)` for a joint attention, `None` for image-only (`attn2`).
    pub joint: Option<bool>,
}

impl Attention {
    pub fn new(p: nn::Path, c: &AttentionConfig) -> Self {
        let inner = c.heads * c.head_dim;
        let norm = |name: &str| c.qk_norm.then(|| RmsNorm::new(&p / name, c.head_dim, 1e-6));
        let added = c.joint.map(|context_pre_only| Added {
            add_q_proj: linear(&p / "add_q_proj", c.dim, inner),
            add_k_proj: linear(&p / "add_k_proj", c.dim, inner),
            add_v_proj: linear(&p / "add_v_proj", c.dim, inner),
            to_add_out: (!context_pre_only).then(|| linear(&p / "to_add_out", inner, c.dim)),
            norm_added_q: norm("norm_added_q"),
            norm_added_k: norm("norm_added_k"),
        });
        Self {
            heads: c.heads,
            head_dim: c.head_dim,
            to_q: linear(&p / "to_q", c.dim, inner),
            to_k: linear(&p / "to_k", c.dim, inner),
            to_v: linear(&p / "to_v", c.dim, inner),
            to_out: linear(&p / "to_out" / 0, inner, c.dim),
            norm_q: norm("norm_q"),
            norm_k: norm("norm_k"),
            added,
        }
    }

    /// (B, L, inner) -> (B, heads, L, head_dim)
    fn split(&self, x: &Tensor) -> Tensor {
        let b = x.size()[0];
        x.view([b, -1, self.heads, self.head_dim]).transpose(1, 2)
    }

    fn norm(n: &Option<RmsNorm>, x: Tensor) -> Tensor {
        match n {
            Some(n) => n.forward(&x),
            None => x,
        }
    }

    /// Joint attention over [image tokens, context tokens]; returns the image output and,
    /// when a context was given and this is not a `context_pre_only` attention, the context
    /// output.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> (Tensor, Option<Tensor>) {
        let b = x.size()[0];
        let n_img = x.size()[1];
        let mut q = Self::norm(&self.norm_q, self.split(&self.to_q.forward(x)));
        let mut k = Self::norm(&self.norm_k, self.split(&self.to_k.forward(x)));
        let mut v = self.split(&self.to_v.forward(x));
        let joint = match (context, &self.added) {
            (Some(c), Some(a)) => {
                let cq = Self::norm(&a.norm_added_q, self.split(&a.add_q_proj.forward(c)));
                let ck = Self::norm(&a.norm_added_k, self.split(&a.add_k_proj.forward(c)));
                let cv = self.split(&a.add_v_proj.forward(c));
                q = Tensor::cat(&[q, cq], 2);
                k = Tensor::cat(&[k, ck], 2);
                v = Tensor::cat(&[v, cv], 2);
                Some(a)
            }
            _ => None,
        };
        let qk = q.kind();
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
        .to_kind(qk);
        match joint {
            Some(a) => {
                let total = h.size()[1];
                let img = h.narrow(1, 0, n_img);
                let ctx = h.narrow(1, n_img, total - n_img);
                let ctx = a.to_add_out.as_ref().map(|o| o.forward(&ctx));
                (self.to_out.forward(&img), ctx)
            }
            None => (self.to_out.forward(&h), None),
        }
    }
}

/// `FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate")`: `net.0.proj`, tanh GELU,
/// `net.2`.
#[derive(Debug)]
pub struct FeedForward {
    proj: crate::linear::SiteLinear,
    out: crate::linear::SiteLinear,
}

impl FeedForward {
    pub fn new(p: nn::Path, dim: i64) -> Self {
        let net = &p / "net";
        Self {
            proj: linear(&net / 0 / "proj", dim, 4 * dim),
            out: linear(&net / 2, 4 * dim, dim),
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.out.forward(&self.proj.forward(x).gelu("tanh"))
    }
}
