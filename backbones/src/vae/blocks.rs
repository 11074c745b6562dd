//! The blocks `AutoencoderKL` is made of, with diffusers' module names: `ResnetBlock2D`
//! (no time embedding), the mid-block `Attention` (one head over all channels, current
//! `to_q/to_k/to_v/to_out.0` names), `Downsample2D` (asymmetric pad, stride-2 conv),
//! `Upsample2D` (nearest x2, conv), `DownEncoderBlock2D`, `UpDecoderBlock2D`, `UNetMidBlock2D`.
use tch::nn::{self, Module};
use tch::Tensor;

/// diffusers' `resnet_eps` and attention `eps` in the VAE.
const EPS: f64 = 1e-6;

pub(crate) fn conv(
    p: nn::Path,
    c_in: i64,
    c_out: i64,
    k: i64,
    stride: i64,
    pad: i64,
) -> nn::Conv2D {
    nn::conv2d(
        p,
        c_in,
        c_out,
        k,
        nn::ConvConfig {
            stride,
            padding: pad,
            ..Default::default()
        },
    )
}

pub(crate) fn group_norm(p: nn::Path, groups: i64, c: i64) -> nn::GroupNorm {
    nn::group_norm(
        p,
        groups,
        c,
        nn::GroupNormConfig {
            eps: EPS,
            ..Default::default()
        },
    )
}

/// `ResnetBlock2D` without time embedding; `conv_shortcut` (1x1) when the width changes.
#[derive(Debug)]
pub struct ResnetBlock2D {
    pub norm1: nn::GroupNorm,
    pub conv1: nn::Conv2D,
    pub norm2: nn::GroupNorm,
    pub conv2: nn::Conv2D,
    pub conv_shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock2D {
    pub fn new(p: nn::Path, c_in: i64, c_out: i64, groups: i64) -> Self {
        Self {
            norm1: group_norm(&p / "norm1", groups, c_in),
            conv1: conv(&p / "conv1", c_in, c_out, 3, 1, 1),
            norm2: group_norm(&p / "norm2", groups, c_out),
            conv2: conv(&p / "conv2", c_out, c_out, 3, 1, 1),
            conv_shortcut: (c_in != c_out)
                .then(|| conv(&p / "conv_shortcut", c_in, c_out, 1, 1, 0)),
        }
    }
}

impl Module for ResnetBlock2D {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(xs).silu());
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.conv_shortcut {
            Some(s) => s.forward(xs) + h,
            None => xs + h,
        }
    }
}

/// The mid block's `Attention`: group norm, single-head attention over the H*W positions,
/// `to_out.0`, residual.
#[derive(Debug)]
pub struct VaeAttention {
    pub group_norm: nn::GroupNorm,
    pub to_q: nn::Linear,
    pub to_k: nn::Linear,
    pub to_v: nn::Linear,
    pub to_out: nn::Linear,
}

impl VaeAttention {
    pub fn new(p: nn::Path, c: i64, groups: i64) -> Self {
        let lin = |name: &str| nn::linear(&p / name, c, c, Default::default());
        Self {
            group_norm: group_norm(&p / "group_norm", groups, c),
            to_q: lin("to_q"),
            to_k: lin("to_k"),
            to_v: lin("to_v"),
            to_out: nn::linear(&p / "to_out" / 0, c, c, Default::default()),
        }
    }
}

impl Module for VaeAttention {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, c, h, w) = xs.size4().expect("[B, C, H, W]");
        let x = self
            .group_norm
            .forward(xs)
            .view([b, c, h * w])
            .transpose(1, 2);
        let heads = |t: Tensor| t.unsqueeze(1);
        let q = heads(self.to_q.forward(&x));
        let k = heads(self.to_k.forward(&x));
        let v = heads(self.to_v.forward(&x));
        let scale = (c as f64).powf(-0.5);
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            scale,
            false,
        )
        .squeeze_dim(1);
        let out = self
            .to_out
            .forward(&out)
            .transpose(1, 2)
            .reshape([b, c, h, w]);
        out + xs
    }
}

/// `UNetMidBlock2D` as the VAE uses it: resnet, (attention), resnet.
#[derive(Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attention: Option<VaeAttention>,
}

impl MidBlock {
    pub fn new(p: nn::Path, c: i64, groups: i64, attention: bool) -> Self {
        let r = &p / "resnets";
        Self {
            resnets: vec![
                ResnetBlock2D::new(&r / 0, c, c, groups),
                ResnetBlock2D::new(&r / 1, c, c, groups),
            ],
            attention: attention.then(|| VaeAttention::new(&p / "attentions" / 0, c, groups)),
        }
    }
}

impl Module for MidBlock {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(xs);
        if let Some(a) = &self.attention {
            h = a.forward(&h);
        }
        self.resnets[1].forward(&h)
    }
}

/// `DownEncoderBlock2D`: resnets, then `downsamplers.0.conv` (pad right/bottom by one, 3x3
/// stride 2) except in the last block.
#[derive(Debug)]
pub struct DownEncoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsample: Option<nn::Conv2D>,
}

impl DownEncoderBlock2D {
    pub fn new(p: nn::Path, c_in: i64, c_out: i64, layers: i64, groups: i64, down: bool) -> Self {
        let r = &p / "resnets";
        let resnets = (0..layers)
            .map(|i| ResnetBlock2D::new(&r / i, if i == 0 { c_in } else { c_out }, c_out, groups))
            .collect();
        let downsample =
            down.then(|| conv(&p / "downsamplers" / 0 / "conv", c_out, c_out, 3, 2, 0));
        Self {
            resnets,
            downsample,
        }
    }
}

impl Module for DownEncoderBlock2D {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut h = xs.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h);
        }
        match &self.downsample {
            Some(c) => c.forward(&h.constant_pad_nd([0, 1, 0, 1])),
            None => h,
        }
    }
}

/// `UpDecoderBlock2D`: resnets, then `upsamplers.0.conv` after nearest x2 except in the last
/// block.
#[derive(Debug)]
pub struct UpDecoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsample: Option<nn::Conv2D>,
}

impl UpDecoderBlock2D {
    pub fn new(p: nn::Path, c_in: i64, c_out: i64, layers: i64, groups: i64, up: bool) -> Self {
        let r = &p / "resnets";
        let resnets = (0..layers)
            .map(|i| ResnetBlock2D::new(&r / i, if i == 0 { c_in } else { c_out }, c_out, groups))
            .collect();
        let upsample = up.then(|| conv(&p / "upsamplers" / 0 / "conv", c_out, c_out, 3, 1, 1));
        Self { resnets, upsample }
    }
}

impl Module for UpDecoderBlock2D {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut h = xs.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h);
        }
        match &self.upsample {
            Some(c) => {
                let (_, _, hh, ww) = h.size4().expect("[B, C, H, W]");
                c.forward(&h.upsample_nearest2d([hh * 2, ww * 2], None, None))
            }
            None => h,
        }
    }
}
