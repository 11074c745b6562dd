//! `softalign loss` on a tiny diffusers SD3 checkpoint against a pair-by-pair Python reference
//! (bare backbone), chunked and unchunked; a seeded run with adapters; and the shipped SD3
//! recipes passing `softalign recipe check`.
use crate::objectives_common::python as common;

use std::path::Path;
use std::process::Command;

fn python_fixture() -> tempfile::TempDir {
    common::python_fixture("objectives_sd3_reference.py")
}

fn softalign(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "softalign {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const RECIPE: &str = r#"
[backbone]
type = "sd3"
path = "tiny_sd3"

[[adapter]]
type = "soft_tokens"
tokens = 2
sites = "joint_blocks[0..5]"
time_buckets = 10
sets = ["positive", "negative"]
ema = true

[[objective]]
type = "softrepa_contrastive"
scale = 2.0
temperature = 0.5

[[objective]]
type = "dsm"
weight = 10.0

[[objective]]
type = "agsm"

[train]
steps = 1
lr = 1e-3
images_per_step = 3
device = "cpu"
"#;

#[test]
fn loss_matches_the_diffusers_reference() {
    let dir = python_fixture();
    let recipe = dir.path().join("recipe.toml");
    std::fs::write(&recipe, RECIPE).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("expected.json")).unwrap())
            .unwrap();
    let (r, b) = (
        recipe.to_str().unwrap(),
        dir.path().join("batch.safetensors"),
    );
    let b = b.to_str().unwrap();
    for chunk in ["", "train.pairs_per_forward=2"] {
        let mut args = vec!["loss", "--recipe", r, "--batch", b, "--no-adapter"];
        if !chunk.is_empty() {
            args.extend(["--set", chunk]);
        }
        let got = softalign(&args);
        for (name, want) in expected.as_object().unwrap() {
            let v = if name == "total" {
                &got["total"]
            } else {
                &got["terms"][name]
            };
            let d = (v.as_f64().unwrap() - want.as_f64().unwrap()).abs();
            eprintln!("sd3 bare {chunk:28} {name:22} diff {d:.2e}");
            assert!(
                d < 1e-5 * want.as_f64().unwrap().abs().max(1.0),
                "{name}: {v} vs {want}"
            );
        }
    }
    // With adapters: seeded, so two runs agree, and the tokens change the predictions.
    let with = |seed: &str| softalign(&["loss", "--recipe", r, "--batch", b, "--seed", seed]);
    let (a1, a2, a3) = (with("3"), with("3"), with("4"));
    assert_eq!(a1["terms"], a2["terms"]);
    assert_ne!(a1["terms"]["dsm"], a3["terms"]["dsm"]);
    assert_ne!(a1["terms"]["dsm"], expected["dsm"]);
    // psi+ online (diag), psi- online (off-diag), psi+ EMA, psi- EMA; dsm and the contrastive
    // loss read the first set (psi+), whose pairs join AGSM's online psi+ group.
    assert_eq!(a1["forwards"], 4);
}

#[test]
fn shipped_recipes_pass_recipe_check() {
    let dir = python_fixture();
    let tiny = dir.path().join("tiny_sd3");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in ["sd3-softrepa", "sd3-agsm", "sd3-contrastive-dsm"] {
        let file = root.join("recipes").join(format!("{name}.toml"));
        let set = format!("backbone.path={}", tiny.display());
        let out = softalign(&["recipe", "check", file.to_str().unwrap(), "--set", &set]);
        assert_eq!(out["recipe"]["train"]["images_per_step"], 4, "{name}");
        let objectives: Vec<&str> = out["recipe"]["objective"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["type"].as_str().unwrap())
            .collect();
        match name {
            "sd3-agsm" => {
                assert_eq!(objectives, ["agsm"]);
                assert_eq!(out["recipe"]["objective"][0]["gamma_minus"], 0.1);
            }
            "sd3-softrepa" => {
                assert_eq!(objectives, ["softrepa_contrastive", "dsm"]);
                assert_eq!(out["recipe"]["objective"][1]["weight"], 0.0);
            }
            _ => assert_eq!(out["recipe"]["objective"][1]["weight"], 10.0),
        }
    }
}
