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

/// `<dir>/data/train.jsonl`, an image manifest: the first `n` shapes-world training examples as
/// PNGs with their captions, and a corrupt `broken.png` listed at position `broken_at` (0..=n).
pub fn world_image_manifest(
    dir: &Path,
    n: usize,
    broken_at: usize,
) -> Vec<softalign_worlds::shapes::TrainExample> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let examples = softalign_worlds::shapes::train_split(n, 0);
    let mut lines = Vec::new();
    for (i, ex) in examples.iter().enumerate() {
        let name = format!("{i}.png");
        ex.image.save(data.join(&name)).unwrap();
        let captions = serde_json::to_string(&ex.captions).unwrap();
        lines.push(format!(r#"{{"image": "{name}", "captions": {captions}}}"#));
    }
    std::fs::write(data.join("broken.png"), b"\x89PNG truncated").unwrap();
    lines.insert(
        broken_at,
        r#"{"image": "broken.png", "caption": "a red circle"}"#.into(),
    );
    std::fs::write(data.join("train.jsonl"), lines.join("\n")).unwrap();
    examples
}

/// `softalign train --quiet --recipe <recipe> --run-dir <run_dir>`, not checked.
pub fn softalign_train(recipe: &Path, run_dir: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(["train", "--quiet", "--recipe"])
        .arg(recipe)
        .arg("--run-dir")
        .arg(run_dir)
        .output()
        .unwrap()
}
