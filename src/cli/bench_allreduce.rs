//! `softalign bench --allreduce MB,...` under torchrun / srun: what the data-parallel trainer's
//! gradient all-reduce costs per step, on flat f32 gradients of the given sizes split into the
//! trainer's buckets. A barrier before each timed call keeps one rank's lateness out of it.
use std::time::Instant;

use anyhow::{bail, Context};
use softalign_core::dtype::DeviceSpec;
use softalign_core::train::parallel::allreduce_grads;
use softalign_core::train::Collective;
use tch::{Kind, Tensor};

pub fn run(sizes_mb: &[f64], device: &str, iters: usize, warmup: usize) -> anyhow::Result<()> {
    let device = DeviceSpec::parse(device)
        .and_then(|d| d.resolve())
        .context("--device")?;
    let device = softalign_distributed::device_for_rank(device)?;
    let Some(group) = softalign_distributed::from_env(device)? else {
        bail!(
            "--allreduce times the all-reduce between ranks: launch with torchrun \
             (`torchrun --nproc-per-node 2 --no-python softalign bench --allreduce 1,25`) or srun"
        );
    };
    let main = group.launch().rank == 0;
    if main {
        println!(
            "all-reduce of the gradients: {} ranks ({}, {}), {:?}, buckets of {:.0} MB; median of {iters}",
            group.world(),
            group.launch().launcher,
            group.backend().name(),
            device,
            group.bucket_bytes() as f64 / 1048576.0
        );
        println!("| gradients | ms per step | GB/s (size / time) |");
        println!("| --- | --- | --- |");
    }
    for &mb in sizes_mb {
        if !(mb.is_finite() && mb > 0.0) {
            bail!("--allreduce: sizes are positive MB, got {mb}");
        }
        let numel = ((mb * 1048576.0 / 4.0) as i64).max(1);
        // Parameters of the sizes real models have: split into tensors of at most 4 M values.
        let mut params = Vec::new();
        let mut left = numel;
        while left > 0 {
            let n = left.min(4 << 20);
            let p = Tensor::zeros([n], (Kind::Float, device)).set_requires_grad(true);
            p.sum(Kind::Float).backward();
            params.push((format!("p{}", params.len()), p));
            left -= n;
        }
        let mut times = Vec::with_capacity(iters);
        for i in 0..warmup + iters {
            group.barrier("the benchmark")?;
            let t0 = Instant::now();
            allreduce_grads(&group, &params, &[0.0])?;
            if let tch::Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
            if i >= warmup {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        if main {
            println!(
                "| {mb} MB | {:.2} | {:.2} |",
                med * 1e3,
                mb * 1048576.0 / med / 1e9
            );
        }
    }
    group.barrier("the end of the benchmark")?;
    Ok(())
}
