//! W&B logging through the official Python client: a small bridge process
//! (`wandb_bridge.py`, embedded here and written into the run folder) reads one JSON line per
//! logged step on stdin. Rust stays free of any W&B protocol code, and the user's own `wandb`
//! login, settings and version apply.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::json;

use super::config::WandbConfig;
use crate::metrics::MetricsSink;
use crate::{Error, Result};

pub const BRIDGE_SOURCE: &str = include_str!("wandb_bridge.py");
pub const BRIDGE_FILE: &str = "wandb_bridge.py";
/// The bridge's exit code when `import wandb` fails.
pub const MISSING_CLIENT_EXIT: i32 = 3;
const REPLY: &str = "SOFTALIGN_BRIDGE ";
const TAIL: usize = 16 * 1024;

pub struct WandbSink {
    python: String,
    child: Child,
    stdin: Option<ChildStdin>,
    replies: Receiver<String>,
    output: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    finished: bool,
}

fn keep_tail(buf: &Arc<Mutex<String>>, line: &str) {
    if let Ok(mut b) = buf.lock() {
        b.push_str(line);
        b.push('\n');
        if b.len() > TAIL {
            let mut cut = b.len() - TAIL;
            while !b.is_char_boundary(cut) {
                cut += 1;
            }
            b.drain(..cut);
        }
    }
}

/// The W&B run id, kept in the run folder so a resumed run continues the same W&B run.
fn run_id(run_dir: &Path) -> Result<String> {
    let path = run_dir.join("wandb_run_id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_string();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let id = format!(
        "{:012x}",
        crate::train::seed::splitmix64(nanos ^ u64::from(std::process::id())) & 0xFFFF_FFFF_FFFF
    );
    crate::tensors::write_atomic(&path, id.as_bytes())?;
    Ok(id)
}

impl WandbSink {
    /// Starts the bridge with `cfg.python` (default `python3`).
    pub fn start(cfg: &WandbConfig, run_dir: &Path, recipe: &serde_json::Value) -> Result<Self> {
        let python = cfg
            .python
            .clone()
            .unwrap_or_else(|| PathBuf::from("python3"));
        Self::start_with(Command::new(python), cfg, run_dir, recipe)
    }

    /// Starts the bridge with a prepared interpreter command (its program and environment;
    /// the bridge's arguments and pipes are added here).
    pub fn start_with(
        mut cmd: Command,
        cfg: &WandbConfig,
        run_dir: &Path,
        recipe: &serde_json::Value,
    ) -> Result<Self> {
        let python = cmd.get_program().to_string_lossy().into_owned();
        let bridge = run_dir.join(BRIDGE_FILE);
        crate::tensors::write_atomic(&bridge, BRIDGE_SOURCE.as_bytes())?;
        let mut child = cmd
            .arg("-u")
            .arg(&bridge)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                Error::invalid(format!(
                    "W&B logging: cannot start the Python interpreter `{python}`: {e} \
                     (set logging.wandb.python to a Python that has `wandb` installed)"
                ))
            })?;
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, replies) = channel();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            let buf = output.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(std::io::Result::ok) {
                    match line.strip_prefix(REPLY) {
                        Some(r) => {
                            let _ = tx.send(r.to_string());
                        }
                        None => keep_tail(&buf, &line),
                    }
                }
            }));
        }
        if let Some(err) = child.stderr.take() {
            let buf = output.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(std::io::Result::ok) {
                    keep_tail(&buf, &line);
                }
            }));
        }
        let stdin = child.stdin.take();
        let mut sink = Self {
            python,
            child,
            stdin,
            replies,
            output,
            readers,
            finished: false,
        };
        let name = cfg.name.clone().unwrap_or_else(|| {
            run_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "softalign".into())
        });
        let init = json!({"init": {
            "project": cfg.project,
            "entity": cfg.entity,
            "name": name,
            "mode": cfg.mode.as_str(),
            "dir": run_dir.display().to_string(),
            "config": recipe,
            "tags": cfg.tags,
            "id": run_id(run_dir)?,
            "resume": "allow",
        }});
        // A bridge that already exited (missing client) closes the pipe: the write may fail,
        // and the reply wait below reports why.
        let _ = sink.send(&init);
        match sink.replies.recv() {
            Ok(r) if r == "ready" => Ok(sink),
            _ => Err(sink.failure("could not start")),
        }
    }

    fn send(&mut self, v: &serde_json::Value) -> std::io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("bridge input already closed"))?;
        let mut line = v.to_string();
        line.push('\n');
        stdin.write_all(line.as_bytes())?;
        stdin.flush()
    }

    /// Waits for the bridge to exit and turns its exit into an error message.
    fn failure(&mut self, what: &str) -> Error {
        self.stdin = None;
        let status = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        self.finished = true;
        let tail = self
            .output
            .lock()
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        match status {
            Ok(s) if s.code() == Some(MISSING_CLIENT_EXIT) => Error::invalid(format!(
                "W&B logging needs the `wandb` Python client, which `{}` cannot import. \
                 Install it with `{} -m pip install wandb` (or `pip install wandb`), set \
                 logging.wandb.python to a Python that has it, or remove [logging.wandb] \
                 from the recipe.\n{tail}",
                self.python, self.python
            )),
            Ok(s) => Error::invalid(format!(
                "W&B bridge ({} {BRIDGE_FILE}) {what}: it exited with {s}.\n{tail}",
                self.python
            )),
            Err(e) => Error::invalid(format!("W&B bridge {what}: {e}\n{tail}")),
        }
    }
}

impl MetricsSink for WandbSink {
    fn log(&mut self, step: u64, values: &BTreeMap<String, f64>) -> Result<()> {
        let msg = json!({"step": step, "values": values});
        match self.send(&msg) {
            Ok(()) => Ok(()),
            Err(_) => Err(self.failure("stopped while logging")),
        }
    }

    fn finish(&mut self) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        if self.send(&json!({"finish": true})).is_err() {
            return Err(self.failure("stopped before the run finished"));
        }
        self.stdin = None;
        let ok = matches!(self.replies.recv(), Ok(r) if r == "finished");
        let status = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        self.finished = true;
        match status {
            Ok(s) if s.success() && ok => Ok(()),
            _ => {
                let tail = self.output.lock().map(|s| s.clone()).unwrap_or_default();
                Err(Error::invalid(format!(
                    "W&B bridge failed while finishing the run ({status:?}).\n{}",
                    tail.trim()
                )))
            }
        }
    }
}

impl Drop for WandbSink {
    fn drop(&mut self) {
        if !self.finished {
            // End of input makes the bridge close the W&B run cleanly.
            self.stdin = None;
            let _ = self.child.wait();
        }
    }
}
