//! `softalign train`'s signal handling: SIGTERM (Slurm's preemption, `scancel`), SIGINT
//! (Ctrl-C) and SIGUSR1 (Slurm's `--signal=USR1@T` warning before the time limit) ask the
//! trainer to finish its step, checkpoint and stop; the command then exits with
//! [`EXIT_PREEMPTED`]. While a training runs the handlers only store the signal's number into
//! the trainer's flag, so a second signal during the checkpoint write does not kill it half-way
//! (the write is atomic anyway: a killed one leaves the previous checkpoint and `latest` as
//! they were). Outside a training (model loading, the demo's evaluation) the signals act as
//! they always do. SIGKILL still ends a run at once.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use softalign_core::train::StopFlag;

/// `softalign train`'s exit status after a stop request: EX_TEMPFAIL from sysexits.h, "try
/// again later", which a requeueing job script can tell from a failure (1) and success (0).
pub const EXIT_PREEMPTED: i32 = 75;

/// The process's one set of handlers: the flag they set, and whether no training runs (then
/// they take the signal's default action instead).
struct Handlers {
    flag: StopFlag,
    idle: Arc<AtomicBool>,
}

static HANDLERS: OnceLock<Handlers> = OnceLock::new();

/// While held, the signals ask the training to stop instead of ending the process.
pub struct Training {
    flag: StopFlag,
}

impl Training {
    pub fn flag(&self) -> StopFlag {
        self.flag.clone()
    }
}

impl Drop for Training {
    fn drop(&mut self) {
        if let Some(h) = HANDLERS.get() {
            h.idle.store(true, Ordering::SeqCst);
        }
    }
}

/// Routes the stop signals to a fresh flag until the returned guard is dropped. The handlers
/// are installed once per process (the demo trains twice) and never removed.
pub fn stop_on_signals() -> anyhow::Result<Training> {
    let h = match HANDLERS.get() {
        Some(h) => h,
        None => {
            let h = install()?;
            HANDLERS.get_or_init(|| h)
        }
    };
    h.flag.shared().store(0, Ordering::SeqCst);
    h.idle.store(false, Ordering::SeqCst);
    Ok(Training {
        flag: h.flag.clone(),
    })
}

fn install() -> anyhow::Result<Handlers> {
    let h = Handlers {
        flag: StopFlag::new(),
        idle: Arc::new(AtomicBool::new(true)),
    };
    for sig in stop_signals() {
        let fail = |e: std::io::Error| anyhow::anyhow!("cannot handle signal {sig}: {e}");
        signal_hook::flag::register_usize(sig, h.flag.shared(), sig as usize).map_err(fail)?;
        signal_hook::flag::register_conditional_default(sig, h.idle.clone()).map_err(fail)?;
    }
    Ok(h)
}

#[cfg(unix)]
fn stop_signals() -> [i32; 3] {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    [SIGTERM, SIGINT, SIGUSR1]
}

#[cfg(not(unix))]
fn stop_signals() -> [i32; 2] {
    use signal_hook::consts::{SIGINT, SIGTERM};
    [SIGTERM, SIGINT]
}
