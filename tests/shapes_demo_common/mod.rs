//! Shared by the shapes demo tests: a tiny random shapes model folder and running the binary.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use softalign_backbones::sd3::flow_match::FlowMatch;
use softalign_backbones::shapes::{ShapesBackbone, ShapesConfig};
use softalign_core::backbone::Backbone;
use softalign_core::dtype::DType;
use tch::Device;

/// The `tiny` preset with random weights (seeded), saved as a pipeline folder.
pub fn tiny_model(dir: &Path) -> PathBuf {
    tch::manual_seed(7);
    let cfg = ShapesConfig::preset("tiny").unwrap();
    let noise = FlowMatch::new(Default::default(), 1.0).unwrap();
    let model = ShapesBackbone::random(&cfg, Device::Cpu, DType::F32, noise).unwrap();
    let out = dir.join("tiny-base");
    model.save_pretrained(&out).unwrap();
    out
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
