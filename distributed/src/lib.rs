//! Data-parallel training on PyTorch's own c10d: the same TCPStore rendezvous, gloo and NCCL
//! backends that torch DDP uses, reached through a small C++ shim over the libtorch tch links.
//! Launch with `torchrun --nproc-per-node N --no-python softalign train ...` or `srun`.
pub mod group;
pub mod launch;

pub use group::{nccl_built, Backend, ProcessGroup};
pub use launch::Launch;

/// Joins the group the environment describes, or `None` to train alone (no launcher, or a
/// world of one).
pub fn from_env(device: tch::Device) -> softalign_core::Result<Option<ProcessGroup>> {
    let Some(launch) = Launch::from_env()? else {
        return Ok(None);
    };
    let backend = Backend::choose(device)?;
    ProcessGroup::connect(&launch, backend).map(Some)
}

/// The device a rank trains on: under a launcher, a CUDA device is the rank's own
/// (LOCAL_RANK, wrapping when ranks share GPUs); anything else is unchanged.
pub fn device_for_rank(device: tch::Device) -> softalign_core::Result<tch::Device> {
    match (Launch::from_env()?, device) {
        (Some(l), tch::Device::Cuda(_)) => {
            let n = tch::Cuda::device_count().max(1) as usize;
            Ok(tch::Device::Cuda(l.local_rank % n))
        }
        _ => Ok(device),
    }
}
