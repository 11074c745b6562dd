//! diffusers `models/transformers/transformer_2d.py` `Transformer2DModel` on continuous
//! inputs: GroupNorm, `proj_in` (1x1 conv, or linear with `use_linear_projection`), the
//! `BasicTransformerBlock`s, `proj_out`, plus the residual.
use tch::nn::{self, Module};
use tch::Tensor;

use super::attention::BasicTransformerBlock;
use super::resnet::group_norm;

#[derive(Debug)]
enum Proj {
    Conv(nn::Conv2D),
    Linear(crate::linear::SiteLinear),
}

impl Proj {
    fn new(p: nn::Path, i: i64, o: i64, linear: bool) -> Self {
        if linear {
            Proj::Linear(crate::linear::linear(p, i, o, Default::default()))
        } else {
            Proj::Conv(nn::conv2d(p, i, o, 1, Default::default()))
        }
    }
}

/// How a [`Transformer2DModel`] is built.
pub struct Transformer2DConfig {
    pub heads: i64,
    pub head_dim: i64,
    pub in_channels: i64,
    pub num_layers: i64,
    pub cross_attention_dim: i64,
    pub norm_num_groups: i64,
    pub use_linear_projection: bool,
}

#[derive(Debug)]
pub struct Transformer2DModel {
    norm: nn::GroupNorm,
    proj_in: Proj,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl Transformer2DModel {
    pub fn new(p: nn::Path, c: &Transformer2DConfig) -> Self {
        let inner = c.heads * c.head_dim;
        let blocks = &p / "transformer_blocks";
        Self {
            norm: group_norm(&p / "norm", c.norm_num_groups, c.in_channels, 1e-6),
            proj_in: Proj::new(
                &p / "proj_in",
                c.in_channels,
                inner,
                c.use_linear_projection,
            ),
            transformer_blocks: (0..c.num_layers)
                .map(|k| {
                    BasicTransformerBlock::new(
                        &blocks / k,
                        inner,
                        c.heads,
                        c.head_dim,
                        c.cross_attention_dim,
                    )
                })
                .collect(),
            proj_out: Proj::new(
                &p / "proj_out",
                inner,
                c.in_channels,
                c.use_linear_projection,
            ),
        }
    }

    /// `x` (B, C, H, W), `context` (B, L, cross_attention_dim).
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let s = x.size();
        let (b, h, w) = (s[0], s[2], s[3]);
        let n = self.norm.forward(x);
        let tokens = |t: Tensor| {
            let c = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([b, h * w, c])
        };
        let mut y = match &self.proj_in {
            Proj::Conv(c) => tokens(c.forward(&n)),
            Proj::Linear(l) => l.forward(&tokens(n)),
        };
        for blk in &self.transformer_blocks {
            y = blk.forward(&y, context);
        }
        let image = |t: Tensor| {
            let c = t.size()[2];
            t.reshape([b, h, w, c]).permute([0, 3, 1, 2]).contiguous()
        };
        let out = match &self.proj_out {
            Proj::Conv(c) => c.forward(&image(y)),
            Proj::Linear(l) => image(l.forward(&y)),
        };
        out + x
    }
}
