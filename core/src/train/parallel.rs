//! Data parallelism as the trainer sees it: a set of ranks that each run the same task on their
//! own micro-batches and agree on every update. The engine (PyTorch's c10d, in the
//! softalign-distributed crate) plugs in behind [`Collective`]; a single process needs none.
//!
//! How a step is spread: with world size W and `grad_accum` A per rank, rank r runs the
//! micro-batches r*A .. r*A+A-1 of a global step of W*A micro-batches, each seeded exactly as a
//! single process with `grad_accum = W*A` seeds them. Each loss is scaled by 1/(W*A) and the
//! gradients are summed over ranks, so every rank holds the single process's accumulated
//! gradient and takes the same optimizer step.
//!
//! With `contrastive_scope = "global"` the micro-batch itself is shared: every rank draws the
//! same W*B images, computes its share of their pairs, and the ranks' gradients sum to the
//! gradient of one process with W*B images per micro-batch.
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// The collectives the trainer needs. Tensors are dense and contiguous; every rank calls the
/// same collectives in the same order. `what` names the data, for error messages.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sums each tensor in place over all ranks (several may be in flight at once).
    fn allreduce_sum(&self, tensors: &[Tensor], what: &str) -> Result<()>;
    /// Copies `root`'s tensor into every other rank's, in place.
    fn broadcast(&self, tensor: &Tensor, root: usize, what: &str) -> Result<()>;
    /// Every rank's `tensor` (same shape everywhere), in rank order.
    fn all_gather(&self, tensor: &Tensor, what: &str) -> Result<Vec<Tensor>>;
    fn barrier(&self, what: &str) -> Result<()>;
    /// Gradient buckets are at most this many bytes (each is one all-reduce in flight).
    fn bucket_bytes(&self) -> usize {
        25 << 20
    }
}

/// Where this rank's micro-batches sit in the global step.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    pub rank: usize,
    pub world: usize,
    /// `contrastive_scope = "global"`: every rank holds the same micro-batches (all ranks'
    /// images) and computes a share of their pairs, so ranks do not add micro-batches.
    pub shared: bool,
}

impl Placement {
    pub const SINGLE: Placement = Placement {
        rank: 0,
        world: 1,
        shared: false,
    };

    pub fn of(c: Option<&dyn Collective>, shared: bool) -> Self {
        c.map_or(Self::SINGLE, |c| Placement {
            rank: c.rank(),
            world: c.world(),
            shared: shared && c.world() > 1,
        })
    }
    /// The global index of local micro-batch `micro` out of `accum` per rank.
    pub fn global_micro(&self, micro: u32, accum: u32) -> u32 {
        if self.shared {
            micro
        } else {
            self.rank as u32 * accum + micro
        }
    }
    pub fn micros_per_step(&self, accum: u32) -> u32 {
        if self.shared {
            accum
        } else {
            self.world as u32 * accum
        }
    }
    /// Ranks whose summed values each hold the whole step's (shared micro-batches), so a sum
    /// over ranks is divided by this to give the step's value.
    pub fn copies(&self) -> f64 {
        if self.shared {
            self.world as f64
        } else {
            1.0
        }
    }
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

/// Copies rank 0's parameters (and any other state tensors) to every rank.
pub fn broadcast_from_main(c: &dyn Collective, named: &[(String, Tensor)]) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for (name, t) in named {
        c.broadcast(t, 0, name)?;
    }
    Ok(())
}

/// Sums the gradients of `params` and the `extra` values over all ranks. Gradients go in
/// buckets of at most `bucket_bytes` (all in flight together); a gradient undefined on some
/// rank counts as zero there, and stays undefined only where no rank defined it, as in a
/// single process. Returns the summed `extra`.
pub fn allreduce_grads(
    c: &dyn Collective,
    params: &[(String, Tensor)],
    extra: &[f64],
) -> Result<Vec<f64>> {
    let _guard = tch::no_grad_guard();
    let n = params.len();
    // One small buffer: which ranks hold each gradient, then the extra values.
    let mut meta: Vec<f64> = params
        .iter()
        .map(|(_, p)| if p.grad().defined() { 1.0 } else { 0.0 })
        .collect();
    meta.extend_from_slice(extra);
    // On the gradients' device: NCCL reduces CUDA tensors only.
    let device = params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
    let meta_t = Tensor::from_slice(&meta).to_device(device);
    let mut buckets: Vec<(Tensor, Vec<usize>)> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut bytes = 0usize;
    let flush = |current: &mut Vec<usize>, buckets: &mut Vec<(Tensor, Vec<usize>)>| -> Result<()> {
        if current.is_empty() {
            return Ok(());
        }
        let parts: Vec<Tensor> = current
            .iter()
            .map(|&i| {
                let p = &params[i].1;
                let g = p.grad();
                if g.defined() {
                    g.to_kind(Kind::Float).reshape([-1])
                } else {
                    Tensor::zeros([p.numel() as i64], (Kind::Float, p.device()))
                }
            })
            .collect();
        buckets.push((Tensor::f_cat(&parts, 0)?, std::mem::take(current)));
        Ok(())
    };
    for (i, (_, p)) in params.iter().enumerate() {
        let b = p.numel() * 4;
        if bytes + b > c.bucket_bytes() && !current.is_empty() {
            flush(&mut current, &mut buckets)?;
            bytes = 0;
        }
        current.push(i);
        bytes += b;
    }
    flush(&mut current, &mut buckets)?;
    let mut all: Vec<Tensor> = buckets.iter().map(|(t, _)| t.shallow_clone()).collect();
    all.push(meta_t.shallow_clone());
    c.allreduce_sum(&all, "the gradients")?;
    let summed = Vec::<f64>::try_from(&meta_t.to_device(tch::Device::Cpu))
        .map_err(|e| Error::invalid(format!("reading the all-reduced step values: {e}")))?;
    for (flat, idx) in &buckets {
        let mut offset = 0i64;
        for &i in idx {
            let (name, p) = &params[i];
            let len = p.numel() as i64;
            let held_somewhere = summed[i] > 0.0;
            if held_somewhere {
                let part = flat.narrow(0, offset, len).view_as(p).to_kind(p.kind());
                let mut g = p.grad();
                if g.defined() {
                    g.copy_(&part);
                } else {
                    // No gradient here, but another rank has one: this rank gets the same.
                    set_grad(p, &part).map_err(|e| Error::tensor(name, e))?;
                }
            }
            offset += len;
        }
    }
    Ok(summed[n..].to_vec())
}

/// Gives a leaf a gradient where it had none, through a tiny backward pass (tch exposes no
/// grad setter): d/dp sum(p * g) = g.
fn set_grad(p: &Tensor, g: &Tensor) -> std::result::Result<(), tch::TchError> {
    tch::with_grad(|| (p * g.detach()).f_sum(p.kind())?.f_backward())
}
