//! `run_dir/metrics.jsonl`: one JSON object per logged step (`step` plus every value), each
//! line flushed as it is written so a crash loses nothing already logged.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::metrics::MetricsSink;
use crate::{Error, Result};

pub const METRICS_FILE: &str = "metrics.jsonl";

pub struct JsonlSink {
    path: PathBuf,
    file: std::fs::File,
}

impl JsonlSink {
    /// A fresh file (a new run).
    pub fn create(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        let file = std::fs::File::create(&path).map_err(|e| Error::file(&path, e))?;
        Ok(Self { path, file })
    }

    /// Continues a resumed run: lines for steps after `resume_step` were written by the
    /// interrupted process past its last checkpoint and are recomputed now, so they are
    /// dropped first; the file then reads as if the run had never stopped.
    pub fn resume(run_dir: &Path, resume_step: u64) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
            let mut kept = String::with_capacity(text.len());
            for line in text.lines() {
                let step = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64));
                // A torn last line (killed mid-write) has no parsable step and goes too.
                if matches!(step, Some(s) if s <= resume_step) {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
            crate::tensors::write_atomic(&path, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::file(&path, e))?;
        Ok(Self { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl MetricsSink for JsonlSink {
    fn log(&mut self, step: u64, values: &BTreeMap<String, f64>) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        for (k, v) in values {
            // JSON has no NaN/inf: non-finite values are written as null.
            obj.insert(k.clone(), serde_json::Value::from(*v));
        }
        let mut line = serde_json::to_string(&obj).map_err(|e| Error::file(&self.path, e))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::file(&self.path, e))
    }

    fn finish(&mut self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::file(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(dir: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join(METRICS_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn resume_drops_lines_past_the_checkpoint_and_appends() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = JsonlSink::create(dir.path()).unwrap();
        for step in 1..=5 {
            let v = BTreeMap::from([("loss".to_string(), step as f64)]);
            s.log(step, &v).unwrap();
        }
        drop(s);
        let mut s = JsonlSink::resume(dir.path(), 3).unwrap();
        s.log(4, &BTreeMap::from([("loss".to_string(), f64::NAN)]))
            .unwrap();
        let got = lines(dir.path());
        let steps: Vec<u64> = got.iter().map(|v| v["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [1, 2, 3, 4]);
        assert!(got[3]["loss"].is_null());
        assert_eq!(got[1]["loss"].as_f64(), Some(2.0));
    }
}
