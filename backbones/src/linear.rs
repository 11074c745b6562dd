//! `nn::Linear` as a linear site: named by its module path (the nn::Path it is built under, so
//! `transformer_blocks.3.attn.to_q`), it adds whatever the active site hook gives it at forward
//! time (see `softalign_core::linear_site`). Without a hook it is exactly `nn::Linear`. Every
//! model builds its Linear layers through [`linear`], so LoRA reaches them all without the
//! models knowing.
use std::ops::Deref;

use softalign_core::linear_site;
use tch::nn::{self, Module};
use tch::Tensor;

#[derive(Debug)]
pub struct SiteLinear {
    name: String,
    lin: nn::Linear,
}

/// `nn::linear` under `p`, registered as a linear site.
pub fn linear(p: nn::Path, in_dim: i64, out_dim: i64, cfg: nn::LinearConfig) -> SiteLinear {
    let name = p.components().collect::<Vec<_>>().join(".");
    linear_site::register(&name, in_dim, out_dim);
    SiteLinear {
        lin: nn::linear(p, in_dim, out_dim, cfg),
        name,
    }
}

impl SiteLinear {
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The weights stay reachable (`.ws`, `.bs`) as on `nn::Linear`.
impl Deref for SiteLinear {
    type Target = nn::Linear;
    fn deref(&self) -> &nn::Linear {
        &self.lin
    }
}

impl Module for SiteLinear {
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.lin.forward(x);
        let base = linear_site::LinearBase {
            weight: &self.lin.ws,
            bias: self.lin.bs.as_ref(),
            output: &y,
        };
        match linear_site::delta(&self.name, x, &base) {
            Some(d) => y + d,
            None => y,
        }
    }
}
