//! Shared by the shapes demo tests: a tiny shapes base model folder and running the binary.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A tiny shapes base: the `tiny` preset after 2 pretraining steps of the project's pretrain
/// recipe (a freshly initialised MMDiT predicts zero velocity through its zero-initialised
/// output layers, so its samples would not depend on the prompt or the tokens).
pub fn tiny_model(dir: &Path) -> PathBuf {
    pretrained(dir, "recipes/shapes/pretrain.toml")
}

/// 2 pretraining steps of `recipe` (a shapes pretraining recipe) at toy size, in `dir`.
pub fn pretrained(dir: &Path, recipe: &str) -> PathBuf {
    let run = dir.join("pretrain");
    softalign(&[
        "train",
        "--recipe",
        recipe,
        "--set",
        "train.steps=2",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "train.images_per_step=4",
        "--set",
        "data.n=16",
        "--quiet",
        "--run-dir",
        s(&run),
    ]);
    run.join("final")
}

pub fn softalign(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running softalign");
    assert!(
        out.status.success(),
        "softalign {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn png_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    v.sort();
    v
}
