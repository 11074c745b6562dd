//! Shared by the integration tests: running the Python references.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

/// Runs `tests/python/<script> <dir>` with the test-time Python (`SOFTALIGN_PYTHON`, set by
/// scripts/env.sh, else `python3`). Fails, never skips: the references are part of the suite.
pub fn run_python(script: &str, dir: &Path) {
    let py = std::env::var("SOFTALIGN_PYTHON").unwrap_or_else(|_| "python3".into());
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let out = std::process::Command::new(&py)
        .arg(&path)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {py} (source scripts/env.sh, or set SOFTALIGN_PYTHON): {e}")
        });
    assert!(
        out.status.success(),
        "{} failed (the pinned references of requirements-test.txt are required):\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh temp dir filled by `script`.
pub fn python_fixture(script: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    run_python(script, dir.path());
    dir
}

/// `dir/name` parsed as JSON.
pub fn read_json(dir: &Path, name: &str) -> serde_json::Value {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A reference script's output folder: a `manifest.json` and one `<case>/io.safetensors` per case.
pub struct Fixtures {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub manifest: serde_json::Value,
}

impl Fixtures {
    pub fn new(script: &str) -> Self {
        let dir = python_fixture(script);
        let manifest = read_json(dir.path(), "manifest.json");
        Self {
            root: dir.path().to_path_buf(),
            _dir: dir,
            manifest,
        }
    }

    pub fn io(&self, case: &str) -> std::collections::BTreeMap<String, tch::Tensor> {
        softalign_core::tensors::MappedSafetensors::open(
            self.root.join(case).join("io.safetensors"),
        )
        .expect("io file")
        .all()
        .expect("io tensors")
    }
}
