//! A c10d process group (TCPStore rendezvous, then ProcessGroupGloo or ProcessGroupNCCL) behind
//! the trainer's [`Collective`]. Failures come back as errors that name this rank, the
//! collective and, after a roll call over the store, the ranks that are gone.
use std::ffi::{c_char, c_int, c_longlong, c_void, CStr, CString};
use std::time::{Duration, Instant};

use softalign_core::train::Collective;
use softalign_core::{Error, Result};
use tch::Tensor;

use crate::launch::Launch;

type Tp = *const c_void; // at::Tensor*

extern "C" {
    fn sa_free_message(m: *mut c_char);
    fn sa_nccl_built() -> c_int;
    fn sa_group_new(
        backend: c_int,
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        serve_store: c_int,
        timeout_ms: c_longlong,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn sa_group_free(g: *mut c_void);
    fn sa_allreduce_sum(g: *mut c_void, t: *const Tp, n: c_int, err: *mut *mut c_char) -> c_int;
    fn sa_broadcast(g: *mut c_void, t: Tp, root: c_int, err: *mut *mut c_char) -> c_int;
    fn sa_allgather(
        g: *mut c_void,
        input: Tp,
        outputs: *const Tp,
        world: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn sa_barrier(g: *mut c_void, err: *mut *mut c_char) -> c_int;
    fn sa_store_set(
        g: *mut c_void,
        key: *const c_char,
        value: *const c_char,
        err: *mut *mut c_char,
    ) -> c_int;
    fn sa_store_check(
        g: *mut c_void,
        key: *const c_char,
        present: *mut c_int,
        err: *mut *mut c_char,
    ) -> c_int;
}

/// The c10d backend: gloo (CPU tensors) or NCCL (CUDA tensors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
    /// NCCL where this build has it and the training runs on CUDA, gloo otherwise;
    /// SOFTALIGN_DIST_BACKEND=gloo|nccl overrides.
    pub fn choose(device: tch::Device) -> Result<Backend> {
        match std::env::var("SOFTALIGN_DIST_BACKEND").ok().as_deref() {
            Some("gloo") => Ok(Backend::Gloo),
            Some("nccl") => Ok(Backend::Nccl),
            Some(other) => Err(Error::invalid(format!(
                "SOFTALIGN_DIST_BACKEND=`{other}`: expected gloo or nccl"
            ))),
            None if device.is_cuda() && nccl_built() => Ok(Backend::Nccl),
            None => Ok(Backend::Gloo),
        }
    }
}

/// Whether this build compiled the NCCL backend (CUDA and NCCL headers found at build time).
pub fn nccl_built() -> bool {
    unsafe { sa_nccl_built() != 0 }
}

/// One rank's membership of the group. Dropping it leaves the group.
pub struct ProcessGroup {
    raw: *mut c_void,
    launch: Launch,
    backend: Backend,
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { sa_group_free(self.raw) }
    }
}

fn take_message(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown error (no message)".into();
    }
    let s = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { sa_free_message(err) };
    // c10d messages carry a C++ source location on their own line; the first line says it.
    s.lines().next().unwrap_or("").trim().to_string()
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::invalid(format!("{what} `{s}` contains a NUL byte")))
}

impl ProcessGroup {
    /// Meets the other ranks at MASTER_ADDR:MASTER_PORT (rank 0 serves the store unless
    /// torchrun's agent does) and builds the backend. A peer that never comes is an error
    /// after the launch's timeout.
    pub fn connect(launch: &Launch, backend: Backend) -> Result<ProcessGroup> {
        let host = cstring(&launch.master_addr, "MASTER_ADDR")?;
        let serve = launch.rank == 0 && !launch.agent_store;
        let mut raw: *mut c_void = std::ptr::null_mut();
        let mut err: *mut c_char = std::ptr::null_mut();
        let rc = unsafe {
            sa_group_new(
                match backend {
                    Backend::Gloo => 0,
                    Backend::Nccl => 1,
                },
                host.as_ptr(),
                c_int::from(launch.master_port),
                launch.rank as c_int,
                launch.world as c_int,
                c_int::from(serve),
                launch.timeout.as_millis() as c_longlong,
                &mut raw,
                &mut err,
            )
        };
        if rc != 0 {
            return Err(Error::invalid(format!(
                "rank {} of {} ({}): could not join the {} process group at {}:{} (the peers get \
                 {:.0} s to arrive; SOFTALIGN_DIST_TIMEOUT_S changes it): {}",
                launch.rank,
                launch.world,
                launch.launcher,
                backend.name(),
                launch.master_addr,
                launch.master_port,
                launch.timeout.as_secs_f64(),
                take_message(err)
            )));
        }
        Ok(ProcessGroup {
            raw,
            launch: launch.clone(),
            backend,
        })
    }

    pub fn launch(&self) -> &Launch {
        &self.launch
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn check(&self, rc: c_int, err: *mut c_char, what: &str) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        let msg = take_message(err);
        let lost = self.roll_call(Duration::from_secs(5));
        Err(Error::invalid(format!(
            "rank {} of {}: {what} failed ({}: {msg}); {lost}; the run stops here, and \
             `--resume latest` continues it from the last checkpoint",
            self.launch.rank,
            self.launch.world,
            self.backend.name(),
        )))
    }

    /// After a failed collective: every surviving rank signs in on the store and waits a
    /// little for the others; who does not sign in is reported lost.
    fn roll_call(&self, wait: Duration) -> String {
        let me = self.launch.rank;
        let key = |r: usize| format!("softalign/roll-call/{r}");
        let set = (|| -> Result<()> {
            let k = cstring(&key(me), "key")?;
            let v = cstring("alive", "value")?;
            let mut err = std::ptr::null_mut();
            if unsafe { sa_store_set(self.raw, k.as_ptr(), v.as_ptr(), &mut err) } != 0 {
                return Err(Error::invalid(take_message(err)));
            }
            Ok(())
        })();
        if let Err(e) = set {
            let host = if self.launch.agent_store {
                "torchrun's agent".to_string()
            } else {
                "rank 0".to_string()
            };
            return format!(
                "the rendezvous store at {}:{} (served by {host}) cannot be reached either ({e}): \
                 {host} is lost",
                self.launch.master_addr, self.launch.master_port
            );
        }
        let began = Instant::now();
        let mut missing: Vec<usize>;
        loop {
            missing = (0..self.launch.world)
                .filter(|&r| r != me)
                .filter(|&r| {
                    let Ok(k) = cstring(&key(r), "key") else {
                        return true;
                    };
                    let mut present: c_int = 0;
                    let mut err = std::ptr::null_mut();
                    let rc =
                        unsafe { sa_store_check(self.raw, k.as_ptr(), &mut present, &mut err) };
                    if rc != 0 {
                        take_message(err);
                        return true;
                    }
                    present == 0
                })
                .collect();
            if missing.is_empty() || began.elapsed() >= wait {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if missing.is_empty() {
            "every rank answered the roll call after it, so no rank was lost (see the message)"
                .into()
        } else {
            let names: Vec<String> = missing.iter().map(|r| format!("rank {r}")).collect();
            format!(
                "lost: {} (did not answer a roll call over the store within {} s)",
                names.join(", "),
                wait.as_secs()
            )
        }
    }
}

fn ptr(t: &Tensor) -> Tp {
    t.as_ptr() as Tp
}

impl Collective for ProcessGroup {
    fn rank(&self) -> usize {
        self.launch.rank
    }

    fn world(&self) -> usize {
        self.launch.world
    }

    fn allreduce_sum(&self, tensors: &[Tensor], what: &str) -> Result<()> {
        let ptrs: Vec<Tp> = tensors.iter().map(ptr).collect();
        let mut err = std::ptr::null_mut();
        let rc =
            unsafe { sa_allreduce_sum(self.raw, ptrs.as_ptr(), ptrs.len() as c_int, &mut err) };
        self.check(rc, err, &format!("the all-reduce of {what}"))
    }

    fn broadcast(&self, tensor: &Tensor, root: usize, what: &str) -> Result<()> {
        let mut err = std::ptr::null_mut();
        let rc = unsafe { sa_broadcast(self.raw, ptr(tensor), root as c_int, &mut err) };
        self.check(
            rc,
            err,
            &format!("the broadcast of {what} from rank {root}"),
        )
    }

    fn all_gather(&self, tensor: &Tensor, what: &str) -> Result<Vec<Tensor>> {
        let outs: Vec<Tensor> = (0..self.launch.world)
            .map(|_| tensor.empty_like())
            .collect();
        let ptrs: Vec<Tp> = outs.iter().map(ptr).collect();
        let mut err = std::ptr::null_mut();
        let input = tensor.contiguous();
        let rc = unsafe {
            sa_allgather(
                self.raw,
                ptr(&input),
                ptrs.as_ptr(),
                self.launch.world as c_int,
                &mut err,
            )
        };
        self.check(rc, err, &format!("the all-gather of {what}"))?;
        Ok(outs)
    }

    /// SOFTALIGN_DIST_BUCKET_MB sets it (default 25 MB, as torch DDP's bucket_cap_mb).
    fn bucket_bytes(&self) -> usize {
        std::env::var("SOFTALIGN_DIST_BUCKET_MB")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .map_or(25 << 20, |mb| (mb * 1048576.0).max(1.0) as usize)
    }

    fn barrier(&self, what: &str) -> Result<()> {
        let mut err = std::ptr::null_mut();
        let rc = unsafe { sa_barrier(self.raw, &mut err) };
        self.check(rc, err, &format!("the barrier at {what}"))
    }
}
