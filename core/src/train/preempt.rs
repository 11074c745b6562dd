//! Stopping a run early on request (a cluster's SIGTERM / SIGUSR1 before preemption, Ctrl-C):
//! the trainer finishes the step it is in, checkpoints it and leaves a `preempted` marker in
//! the run folder, so a requeued job (or a person) can tell a stopped run from a failed one and
//! continue it with `--resume latest`. Who sets the flag (signal handlers) is the caller's
//! business; the trainer only reads it between steps.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The marker a stopped run leaves in its run folder (JSON); a run that starts there removes it.
pub const MARKER_FILE: &str = "preempted";

/// A request to stop, shared with whoever raises it (a signal handler stores into it, which is
/// why it is a bare atomic): 0 while none is pending, else the signal's number (or any
/// non-zero value for a request that is not a signal).
#[derive(Clone, Default)]
pub struct StopFlag(Arc<AtomicUsize>);

impl StopFlag {
    pub fn new() -> Self {
        Self::default()
    }

    /// The atomic a signal handler stores the signal number into.
    pub fn shared(&self) -> Arc<AtomicUsize> {
        self.0.clone()
    }

    /// Asks the run to stop after its current step, naming why (a signal number).
    pub fn request(&self, signal: i32) {
        self.0.store(signal.max(1) as usize, Ordering::SeqCst);
    }

    /// The pending request's signal number, if any.
    pub fn requested(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            n => Some(n as i32),
        }
    }
}

/// What a run stopped early records (the marker's contents, and the trainer's report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preemption {
    /// Optimizer steps completed; the checkpoint is of this step.
    pub step: u64,
    /// The signal's number as this process saw it (None: another rank of a data-parallel run
    /// got it, and this one stopped with them).
    pub signal: Option<i32>,
    /// Its name (`SIGTERM`), or a description when it is not a known signal.
    pub reason: String,
    /// The checkpoint folder written for `step`.
    pub checkpoint: PathBuf,
}

/// The usual name of a signal number (as the trainer's messages and the marker spell it).
pub fn signal_name(signal: Option<i32>) -> String {
    let Some(n) = signal else {
        return "a stop request on another rank".into();
    };
    #[cfg(unix)]
    {
        for (s, name) in [
            (libc::SIGTERM, "SIGTERM"),
            (libc::SIGINT, "SIGINT"),
            (libc::SIGUSR1, "SIGUSR1"),
        ] {
            if n == s {
                return name.into();
            }
        }
    }
    format!("signal {n}")
}

pub fn marker_path(run_dir: &Path) -> PathBuf {
    run_dir.join(MARKER_FILE)
}

/// Writes the marker atomically (a reader sees the whole JSON or none).
pub fn write_marker(run_dir: &Path, p: &Preemption) -> Result<PathBuf> {
    let path = marker_path(run_dir);
    let json = serde_json::to_vec_pretty(p).map_err(|e| Error::file(&path, e))?;
    crate::tensors::write_atomic(&path, &json)?;
    Ok(path)
}

/// Reads a run folder's marker, if it has one.
pub fn read_marker(run_dir: &Path) -> Result<Option<Preemption>> {
    let path = marker_path(run_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::file(&path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::file(&path, e))
}

/// Removes the marker (a run starting in the folder continues what it recorded).
pub fn remove_marker(run_dir: &Path) -> Result<()> {
    let path = marker_path(run_dir);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::file(&path, e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_holds_the_signal_and_the_marker_round_trips() {
        let f = StopFlag::new();
        assert_eq!(f.requested(), None);
        f.shared().store(libc::SIGTERM as usize, Ordering::SeqCst);
        assert_eq!(f.requested(), Some(libc::SIGTERM));
        let run = tempfile::tempdir().unwrap();
        assert_eq!(read_marker(run.path()).unwrap(), None);
        let p = Preemption {
            step: 7,
            signal: Some(libc::SIGTERM),
            reason: signal_name(Some(libc::SIGTERM)),
            checkpoint: run.path().join("checkpoints/step-00000007"),
        };
        write_marker(run.path(), &p).unwrap();
        assert_eq!(read_marker(run.path()).unwrap(), Some(p));
        remove_marker(run.path()).unwrap();
        remove_marker(run.path()).unwrap();
        assert!(!marker_path(run.path()).exists());
    }
}
