//! diffusers `models/resnet.py` `ResnetBlock2D` (time_embedding_norm "default", SiLU) and the
//! `Downsample2D` / `Upsample2D` convolutions of `downsampling.py` / `upsampling.py`.
use tch::nn::{self, Module};
use tch::Tensor;

fn conv(p: nn::Path, i: i64, o: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        ..Default::default()
    };
    nn::conv2d(p, i, o, k, cfg)
}

pub fn group_norm(p: nn::Path, groups: i64, channels: i64, eps: f64) -> nn::GroupNorm {
    let cfg = nn::GroupNormConfig {
        eps,
        ..Default::default()
    };
    nn::group_norm(p, groups, channels, cfg)
}

/// How a [`ResnetBlock2D`] is built (diffusers' constructor arguments that vary).
pub struct ResnetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub temb_channels: i64,
    pub groups: i64,
    pub eps: f64,
    pub output_scale_factor: f64,
}

#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: crate::linear::SiteLinear,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    /// Present when the block changes the channel count (`use_in_shortcut`).
    conv_shortcut: Option<nn::Conv2D>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(p: nn::Path, c: &ResnetConfig) -> Self {
        let (i, o) = (c.in_channels, c.out_channels);
        Self {
            norm1: group_norm(&p / "norm1", c.groups, i, c.eps),
            conv1: conv(&p / "conv1", i, o, 3, 1, 1),
            time_emb_proj: crate::linear::linear(
                &p / "time_emb_proj",
                c.temb_channels,
                o,
                Default::default(),
            ),
            norm2: group_norm(&p / "norm2", c.groups, o, c.eps),
            conv2: conv(&p / "conv2", o, o, 3, 1, 1),
            conv_shortcut: (i != o).then(|| conv(&p / "conv_shortcut", i, o, 1, 1, 0)),
            output_scale_factor: c.output_scale_factor,
        }
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let t = self
            .time_emb_proj
            .forward(&temb.silu())
            .unsqueeze(-1)
            .unsqueeze(-1);
        let h = self.norm2.forward(&(h + t)).silu();
        // Dropout is the identity: the backbone is always run in eval mode.
        let h = self.conv2.forward(&h);
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x.shallow_clone(),
        };
        let out = skip + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `Downsample2D(use_conv=True, padding)`: a stride-2 3x3 conv; padding 0 pads right/bottom.
#[derive(Debug)]
pub struct Downsample2D {
    conv: nn::Conv2D,
    padding: i64,
}

impl Downsample2D {
    pub fn new(p: nn::Path, channels: i64, padding: i64) -> Self {
        Self {
            conv: conv(&p / "conv", channels, channels, 3, 2, padding),
            padding,
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.padding == 0 {
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D(use_conv=True)`: nearest upsampling to `size` (twice the input unless the
/// skip connection says otherwise), then a 3x3 conv.
#[derive(Debug)]
pub struct Upsample2D {
    conv: nn::Conv2D,
}

impl Upsample2D {
    pub fn new(p: nn::Path, channels: i64) -> Self {
        Self {
            conv: conv(&p / "conv", channels, channels, 3, 1, 1),
        }
    }
    pub fn forward(&self, x: &Tensor, size: [i64; 2]) -> Tensor {
        let up = x.upsample_nearest2d(size, None, None);
        self.conv.forward(&up)
    }
}
