//! diffusers `models/unets/unet_2d_blocks.py`: `CrossAttnDownBlock2D` / `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D` / `UpBlock2D`. A block without attentions
//! is the same type with an empty `attentions` list (their forwards differ only by it).
use tch::nn;
use tch::Tensor;

use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::transformer_2d::{Transformer2DConfig, Transformer2DModel};

/// What every block of one UNet shares.
#[derive(Debug, Clone, Copy)]
pub struct Common {
    pub temb_channels: i64,
    pub groups: i64,
    pub eps: f64,
    pub cross_attention_dim: i64,
    pub use_linear_projection: bool,
}

/// Attention layout of a cross-attention block: `None` for the plain blocks.
#[derive(Debug, Clone, Copy)]
pub struct CrossAttn {
    pub heads: i64,
    pub transformer_layers: i64,
}

fn transformer(p: nn::Path, c: &Common, a: CrossAttn, channels: i64) -> Transformer2DModel {
    Transformer2DModel::new(
        p,
        &Transformer2DConfig {
            heads: a.heads,
            head_dim: channels / a.heads,
            in_channels: channels,
            num_layers: a.transformer_layers,
            cross_attention_dim: c.cross_attention_dim,
            norm_num_groups: c.groups,
            use_linear_projection: c.use_linear_projection,
        },
    )
}

fn resnet(p: nn::Path, c: &Common, i: i64, o: i64, scale: f64) -> ResnetBlock2D {
    ResnetBlock2D::new(
        p,
        &ResnetConfig {
            in_channels: i,
            out_channels: o,
            temb_channels: c.temb_channels,
            groups: c.groups,
            eps: c.eps,
            output_scale_factor: scale,
        },
    )
}

#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: nn::Path,
        c: &Common,
        attn: Option<CrossAttn>,
        in_channels: i64,
        out_channels: i64,
        num_layers: i64,
        add_downsample: bool,
        downsample_padding: i64,
    ) -> Self {
        let (rp, ap) = (&p / "resnets", &p / "attentions");
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            let inc = if i == 0 { in_channels } else { out_channels };
            resnets.push(resnet(&rp / i, c, inc, out_channels, 1.0));
            if let Some(a) = attn {
                attentions.push(transformer(&ap / i, c, a, out_channels));
            }
        }
        Self {
            resnets,
            attentions,
            downsampler: add_downsample.then(|| {
                Downsample2D::new(&p / "downsamplers" / 0, out_channels, downsample_padding)
            }),
        }
    }

    pub fn has_cross_attention(&self) -> bool {
        !self.attentions.is_empty()
    }

    /// Returns the output and the skip states it adds for the up path.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> (Tensor, Vec<Tensor>) {
        let mut h = x.shallow_clone();
        let mut states = Vec::new();
        for (i, r) in self.resnets.iter().enumerate() {
            h = r.forward(&h, temb);
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(&h, context);
            }
            states.push(h.shallow_clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h);
            states.push(h.shallow_clone());
        }
        (h, states)
    }
}

/// `UNetMidBlock2DCrossAttn(num_layers=1)`: resnet, (attention, resnet) per layer.
#[derive(Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn new(p: nn::Path, c: &Common, attn: CrossAttn, channels: i64, scale: f64) -> Self {
        let (rp, ap) = (&p / "resnets", &p / "attentions");
        Self {
            resnets: vec![
                resnet(&rp / 0, c, channels, channels, scale),
                resnet(&rp / 1, c, channels, channels, scale),
            ],
            attentions: vec![transformer(&ap / 0, c, attn, channels)],
        }
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(x, temb);
        for (a, r) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = r.forward(&a.forward(&h, context), temb);
        }
        h
    }
}

#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

/// Channel plan of an up block as diffusers computes it in `UNet2DConditionModel.__init__`.
#[derive(Debug, Clone, Copy)]
pub struct UpChannels {
    pub in_channels: i64,
    pub prev_output_channels: i64,
    pub out_channels: i64,
}

impl UpBlock {
    pub fn new(
        p: nn::Path,
        c: &Common,
        attn: Option<CrossAttn>,
        ch: UpChannels,
        num_layers: i64,
        add_upsample: bool,
    ) -> Self {
        let (rp, ap) = (&p / "resnets", &p / "attentions");
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            let skip = if i == num_layers - 1 {
                ch.in_channels
            } else {
                ch.out_channels
            };
            let inc = if i == 0 {
                ch.prev_output_channels
            } else {
                ch.out_channels
            };
            resnets.push(resnet(&rp / i, c, inc + skip, ch.out_channels, 1.0));
            if let Some(a) = attn {
                attentions.push(transformer(&ap / i, c, a, ch.out_channels));
            }
        }
        Self {
            resnets,
            attentions,
            upsampler: add_upsample
                .then(|| Upsample2D::new(&p / "upsamplers" / 0, ch.out_channels)),
        }
    }

    pub fn has_cross_attention(&self) -> bool {
        !self.attentions.is_empty()
    }

    /// How many skip states the block consumes.
    pub fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` in the order they were produced (the last is consumed first); `upsample_size`
    /// is the spatial size of the next block's skip states.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<[i64; 2]>,
    ) -> Tensor {
        let mut h = x.shallow_clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let skip = &skips[skips.len() - 1 - i];
            h = r.forward(&Tensor::cat(&[&h, skip], 1), temb);
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(&h, context);
            }
        }
        match (&self.upsampler, upsample_size) {
            (Some(u), Some(size)) => u.forward(&h, size),
            (Some(u), None) => {
                let s = h.size();
                u.forward(&h, [s[2] * 2, s[3] * 2])
            }
            _ => h,
        }
    }
}
