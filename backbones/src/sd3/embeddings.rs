//! diffusers `models/embeddings.py`: the patch embedding with its cropped 2-D sin-cos table,
//! and the timestep + pooled-text conditioning of SD3.
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use softalign_core::{Error, Result};

/// `get_timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift)` in fp32.
pub fn timestep_embedding(t: &Tensor, dim: i64, flip_sin_to_cos: bool, shift: f64) -> Tensor {
    let half = dim / 2;
    let exponent = Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln()));
    let exponent = exponent / (half as f64 - shift);
    let freqs = exponent.exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    let (sin, cos) = (args.sin(), args.cos());
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], -1)
    } else {
        Tensor::cat(&[sin, cos], -1)
    };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// `get_1d_sincos_pos_embed_from_grid(dim, pos)`, in fp64 as diffusers computes it on CPU/CUDA.
fn sincos_1d(dim: i64, pos: &Tensor) -> Tensor {
    let omega = Tensor::arange(dim / 2, (Kind::Double, pos.device())) / (dim as f64 / 2.0);
    let omega = Tensor::pow_scalar(10000.0, &omega).reciprocal();
    let out = pos.reshape([-1]).to_kind(Kind::Double).outer(&omega);
    Tensor::cat(&[out.sin(), out.cos()], 1)
}

/// `get_2d_sincos_pos_embed(dim, (h, w), base_size)` as (1, h*w, dim) fp32. The grid
/// coordinates are fp32 (`arange(n) / (n / base_size)` per axis), the trigonometry fp64.
/// diffusers' meshgrid puts the column coordinate first: the first half of each row encodes
/// the column.
pub fn sincos_2d(dim: i64, h: i64, w: i64, base_size: i64, device: Device) -> Tensor {
    let axis = |n: i64| Tensor::arange(n, (Kind::Float, device)) / (n as f64 / base_size as f64);
    let cols = axis(w).unsqueeze(0).expand([h, w], false);
    let rows = axis(h).unsqueeze(1).expand([h, w], false);
    let emb = Tensor::cat(&[sincos_1d(dim / 2, &cols), sincos_1d(dim / 2, &rows)], 1);
    emb.to_kind(Kind::Float).unsqueeze(0)
}

/// Where the positional table comes from: SD3's persistent (max x max) table, centre-cropped
/// to the latent, or (`pos_embed_max_size: null`, PixArt-style configs) a table computed for
/// the latent's own grid, which diffusers keeps as a non-persistent buffer (not in the file).
#[derive(Debug)]
enum PosTable {
    Cropped { table: Tensor, max_size: i64 },
    PerGrid { dim: i64, base_size: i64 },
}

/// `PatchEmbed`: a stride-`patch` conv, then the 2-D sin-cos positions.
#[derive(Debug)]
pub struct PatchEmbed {
    proj: nn::Conv2D,
    pos: PosTable,
    patch: i64,
}

impl PatchEmbed {
    /// `max_size`: `pos_embed_max_size` (None: the table follows the latent's grid).
    pub fn new(
        p: nn::Path,
        in_channels: i64,
        dim: i64,
        patch: i64,
        max_size: Option<i64>,
        base_size: i64,
    ) -> Self {
        let cfg = nn::ConvConfig {
            stride: patch,
            ..Default::default()
        };
        let proj = nn::conv2d(&p / "proj", in_channels, dim, patch, cfg);
        let pos = match max_size {
            Some(max_size) => {
                let mut table = p.zeros_no_train("pos_embed", &[1, max_size * max_size, dim]);
                let values = sincos_2d(dim, max_size, max_size, base_size, p.device());
                tch::no_grad(|| table.copy_(&values));
                PosTable::Cropped { table, max_size }
            }
            None => PosTable::PerGrid { dim, base_size },
        };
        Self { proj, pos, patch }
    }

    /// The persistent table (None where the config computes it per grid).
    pub fn pos_embed(&self) -> Option<&Tensor> {
        match &self.pos {
            PosTable::Cropped { table, .. } => Some(table),
            PosTable::PerGrid { .. } => None,
        }
    }

    fn positions(&self, h: i64, w: i64, device: Device) -> Result<Tensor> {
        let (h, w) = (h / self.patch, w / self.patch);
        let (table, max_size) = match &self.pos {
            PosTable::PerGrid { dim, base_size } => {
                return Ok(sincos_2d(*dim, h, w, *base_size, device))
            }
            PosTable::Cropped { table, max_size } => (table, *max_size),
        };
        if h > max_size || w > max_size {
            return Err(Error::tensor(
                "hidden_states",
                format!("latent of {h}x{w} patches exceeds pos_embed_max_size {max_size}"),
            ));
        }
        let top = (max_size - h) / 2;
        let left = (max_size - w) / 2;
        let d = *table.size().last().expect("3-D table");
        Ok(table
            .reshape([1, max_size, max_size, d])
            .narrow(1, top, h)
            .narrow(2, left, w)
            .reshape([1, -1, d]))
    }

    pub fn forward(&self, latent: &Tensor) -> Result<Tensor> {
        let (h, w) = (latent.size()[2], latent.size()[3]);
        let x = self.proj.forward(latent).flatten(2, -1).transpose(1, 2);
        let pos = self.positions(h, w, latent.device())?;
        let k = x.kind();
        Ok((x + pos).to_kind(k))
    }
}

/// `TimestepEmbedding(256, dim)` (linear_1, SiLU, linear_2) and
/// `PixArtAlphaTextProjection(pooled, dim, act_fn="silu")` share this shape.
#[derive(Debug)]
pub struct Mlp {
    linear_1: crate::linear::SiteLinear,
    linear_2: crate::linear::SiteLinear,
}

impl Mlp {
    pub fn new(p: nn::Path, i: i64, hidden: i64) -> Self {
        Self {
            linear_1: crate::linear::linear(&p / "linear_1", i, hidden, Default::default()),
            linear_2: crate::linear::linear(&p / "linear_2", hidden, hidden, Default::default()),
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(x).silu())
    }
}

/// `CombinedTimestepTextProjEmbeddings`: sinusoid(256, flip_sin_to_cos, shift 0) of the
/// timestep through `timestep_embedder`, plus the pooled text through `text_embedder`.
#[derive(Debug)]
pub struct CombinedTimestepTextProjEmbeddings {
    timestep_embedder: Mlp,
    text_embedder: Mlp,
}

impl CombinedTimestepTextProjEmbeddings {
    pub fn new(p: nn::Path, dim: i64, pooled_dim: i64) -> Self {
        Self {
            timestep_embedder: Mlp::new(&p / "timestep_embedder", 256, dim),
            text_embedder: Mlp::new(&p / "text_embedder", pooled_dim, dim),
        }
    }
    pub fn forward(&self, timestep: &Tensor, pooled: &Tensor) -> Tensor {
        let proj = timestep_embedding(timestep, 256, true, 0.0).to_kind(pooled.kind());
        self.timestep_embedder.forward(&proj) + self.text_embedder.forward(pooled)
    }
}
