//! diffusers `models/normalization.py`: the adaptive layer norms and RMSNorm of SD3/SD3.5.
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// `nn.LayerNorm(dim, elementwise_affine=False, eps)`.
pub fn layer_norm(x: &Tensor, eps: f64) -> Tensor {
    let d = *x.size().last().expect("layer_norm on a scalar");
    x.layer_norm([d], None::<Tensor>, None::<Tensor>, eps, false)
}

fn linear(p: nn::Path, i: i64, o: i64) -> crate::linear::SiteLinear {
    crate::linear::linear(p, i, o, Default::default())
}

/// `RMSNorm(dim, eps)` with a weight (the qk-norm of SD3.5).
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: p.ones("weight", &[dim]),
            eps,
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        // The variance in fp32; the product promotes to fp32 and comes back to a half
        // weight's dtype before the scale, as in diffusers.
        let var = x
            .to_kind(Kind::Float)
            .pow_tensor_scalar(2)
            .mean_dim(-1, true, Kind::Float);
        let mut h = x * (var + self.eps).rsqrt();
        let wk = self.weight.kind();
        if matches!(wk, Kind::Half | Kind::BFloat16) {
            h = h.to_kind(wk);
        }
        h * &self.weight
    }
}

/// Modulation outputs of [`AdaLayerNormZero`] (and the first five of the X variant).
pub struct Modulation {
    pub x: Tensor,
    pub gate_msa: Tensor,
    pub shift_mlp: Tensor,
    pub scale_mlp: Tensor,
    pub gate_mlp: Tensor,
}

fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    x * (scale.unsqueeze(1) + 1) + shift.unsqueeze(1)
}

/// `AdaLayerNormZero(dim)`: `linear` maps the conditioning to 6 * dim.
#[derive(Debug)]
pub struct AdaLayerNormZero {
    linear: crate::linear::SiteLinear,
}

impl AdaLayerNormZero {
    pub fn new(p: nn::Path, dim: i64) -> Self {
        Self {
            linear: linear(p / "linear", dim, 6 * dim),
        }
    }
    pub fn forward(&self, x: &Tensor, emb: &Tensor) -> Modulation {
        let c = self.linear.forward(&emb.silu()).chunk(6, 1);
        Modulation {
            x: modulate(&layer_norm(x, 1e-6), &c[0], &c[1]),
            gate_msa: c[2].shallow_clone(),
            shift_mlp: c[3].shallow_clone(),
            scale_mlp: c[4].shallow_clone(),
            gate_mlp: c[5].shallow_clone(),
        }
    }
}

/// `SD35AdaLayerNormZeroX(dim)`: AdaLayerNormZero plus a second modulated copy of the
/// normalised input for the dual attention (`attn2`) and its gate.
#[derive(Debug)]
pub struct Sd35AdaLayerNormZeroX {
    linear: crate::linear::SiteLinear,
}

impl Sd35AdaLayerNormZeroX {
    pub fn new(p: nn::Path, dim: i64) -> Self {
        Self {
            linear: linear(p / "linear", dim, 9 * dim),
        }
    }
    /// The modulation, the `attn2` input and its gate.
    pub fn forward(&self, x: &Tensor, emb: &Tensor) -> (Modulation, Tensor, Tensor) {
        let c = self.linear.forward(&emb.silu()).chunk(9, 1);
        let normed = layer_norm(x, 1e-6);
        let m = Modulation {
            x: modulate(&normed, &c[0], &c[1]),
            gate_msa: c[2].shallow_clone(),
            shift_mlp: c[3].shallow_clone(),
            scale_mlp: c[4].shallow_clone(),
            gate_mlp: c[5].shallow_clone(),
        };
        let x2 = modulate(&normed, &c[6], &c[7]);
        (m, x2, c[8].shallow_clone())
    }
}

/// `AdaLayerNormContinuous(dim, cond_dim, elementwise_affine=False, eps=1e-6)`: scale first,
/// then shift.
#[derive(Debug)]
pub struct AdaLayerNormContinuous {
    linear: crate::linear::SiteLinear,
    eps: f64,
}

impl AdaLayerNormContinuous {
    pub fn new(p: nn::Path, dim: i64, cond_dim: i64, eps: f64) -> Self {
        Self {
            linear: linear(p / "linear", cond_dim, 2 * dim),
            eps,
        }
    }
    pub fn forward(&self, x: &Tensor, cond: &Tensor) -> Tensor {
        let c = self
            .linear
            .forward(&cond.silu().to_kind(x.kind()))
            .chunk(2, 1);
        modulate(&layer_norm(x, self.eps), &c[1], &c[0])
    }
}
