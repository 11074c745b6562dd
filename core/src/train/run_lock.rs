//! One writer per run folder: the trainer holds an exclusive flock on `run_dir/lock` for the
//! whole run. Two trainings pointed at one folder would interleave checkpoints, rotate each
//! other's folders away and clear each other's half-written ones; the second is refused with
//! the pid and host of the first, which the lock file records. The kernel drops a flock when
//! its process dies, however it dies, so a crashed run's lock is simply taken by the next one;
//! the file itself stays (deleting it on exit would let a waiting process lock a file that is
//! no longer the folder's).
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use fs4::{FileExt, TryLockError};

use crate::{Error, Result};

pub const LOCK_FILE: &str = "lock";

/// Held while a run writes its folder; dropping it (or the process ending) releases the lock.
#[derive(Debug)]
pub struct RunLock {
    // Never read: holding the open file is what holds the flock.
    _file: File,
    path: PathBuf,
}

impl RunLock {
    /// Takes `run_dir/lock`, or says who holds it.
    pub fn acquire(run_dir: &Path) -> Result<RunLock> {
        let path = run_dir.join(LOCK_FILE);
        // Not truncated on open: until this process holds the lock, the text is the holder's.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::file(&path, e))?;
        // Fully qualified: std's own `File::try_lock` (Rust 1.89) is newer than this crate's MSRV.
        match <File as FileExt>::try_lock(&file) {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = describe_holder(&text);
                return Err(Error::file(
                    run_dir,
                    format!(
                        "another training is writing this run folder ({holder}, per {}); two \
                         trainings must not share one folder: wait for it to end, stop it, or \
                         choose another --run-dir",
                        path.display()
                    ),
                ));
            }
            Err(TryLockError::Error(e)) => {
                return Err(Error::file(&path, format!("cannot lock it: {e}")))
            }
        }
        let record = serde_json::json!({
            "pid": std::process::id(),
            "host": hostname(),
        });
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(format!("{record}\n").as_bytes()))
            .and_then(|_| file.flush())
            .map_err(|e| Error::file(&path, e))?;
        Ok(RunLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// "pid 123 on host node7" from the lock file's JSON (which the holder may still be writing).
fn describe_holder(text: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
    match (v["pid"].as_u64(), v["host"].as_str()) {
        (Some(pid), Some(host)) => format!("pid {pid} on host {host}"),
        (Some(pid), None) => format!("pid {pid}"),
        _ => "a process that has not recorded its pid yet".into(),
    }
}

/// This machine's name, as `hostname` prints it (Linux: the kernel's; elsewhere best-effort).
fn hostname() -> String {
    for f in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(s) = std::fs::read_to_string(f) {
            let s = s.trim();
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_and_the_lock_is_released_on_drop() {
        let run = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(run.path()).unwrap();
        // flock locks belong to the open file description: a second open in the same process
        // conflicts like another process would.
        let err = RunLock::acquire(run.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())) && err.contains("host "),
            "{err}"
        );
        assert!(err.contains(&run.path().display().to_string()), "{err}");
        drop(first);
        let again = RunLock::acquire(run.path()).unwrap();
        assert!(again.path().ends_with(LOCK_FILE));
    }
}
