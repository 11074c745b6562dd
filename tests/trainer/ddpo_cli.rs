//! `softalign train` in DDPO mode on the shipped shapes UNet base, shrunk to seconds: 4
//! trajectories of 3 DDIM steps per round, two optimizer steps per round. The run logs its
//! rounds and rewards and writes a LoRA the other commands load; a run stopped in the middle
//! of a round resumes to the same adapter bit for bit; recipes DDPO cannot run are refused
//! before any weights load.
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use tch::Tensor;

const RECIPE: &str = "recipes/shapes/unet-ddpo-lora.toml";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The recipe at toy size, with `extra` overrides.
fn train(run_dir: &Path, steps: u64, extra: &[&str]) -> Output {
    let mut args: Vec<String> = [
        "train",
        "--recipe",
        RECIPE,
        "--quiet",
        "--set",
        "ddpo.samples_per_round=4",
        "--set",
        "ddpo.sample_batch=4",
        "--set",
        "ddpo.timestep_fraction=0.67",
        "--set",
        "train.images_per_step=2",
        "--set",
        "train.grad_accum=1",
        "--set",
        "sampler.steps=3",
        "--set",
        "train.checkpoint.every=1",
        "--run-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(run_dir.display().to_string());
    args.push("--set".into());
    args.push(format!("train.steps={steps}"));
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(&args)
        .current_dir(root())
        .output()
        .expect("running softalign")
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn adapter(dir: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(dir.join("final/adapter.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn ddpo_trains_a_lora_by_rounds_and_resumes_mid_round_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let err = ok(train(&straight, 4, &[])).stderr;
    let err = String::from_utf8_lossy(&err);
    assert!(err.contains("ddpo: sampling with DDIM 3 steps"), "{err}");
    assert!(err.contains("eta 1"), "{err}");
    let metrics = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("reward_mean").is_some())
        .collect();
    assert_eq!(rows.len(), 4, "{metrics}");
    let rounds: Vec<f64> = rows.iter().map(|r| r["round"].as_f64().unwrap()).collect();
    assert_eq!(rounds, [0.0, 0.0, 1.0, 1.0]);
    for r in &rows {
        let reward = r["reward_mean"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&reward), "{r}");
        for k in ["loss", "approx_kl", "clip_fraction"] {
            assert!(r[k].as_f64().unwrap().is_finite(), "{k}: {r}");
        }
    }
    // The first step of a round is on-policy: the training pass re-scores the sampled steps
    // with the same weights (other batch sizes: equal up to rounding), so nothing is clipped.
    for first in [&rows[0], &rows[2]] {
        assert_eq!(first["clip_fraction"].as_f64(), Some(0.0), "{first}");
        assert!(first["approx_kl"].as_f64().unwrap() < 1e-8, "{first}");
    }
    // The LoRA moved, and is also written as diffusers / PEFT files.
    let a = adapter(&straight);
    assert!(a
        .values()
        .any(|t| t.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0));
    assert!(std::fs::read_dir(straight.join("final"))
        .unwrap()
        .any(|e| e.unwrap().file_name() != "adapter.safetensors"));

    // Stopped after step 3, in the middle of round 1: its trajectories come from the
    // checkpoint, not a new draw, so the resumed run ends where the straight one did.
    let split = tmp.path().join("split");
    ok(train(&split, 3, &[]));
    ok(train(
        &split,
        4,
        &["--resume", "latest", "--allow-recipe-change"],
    ));
    let b = adapter(&split);
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert!(t.equal(&b[k]), "{k} differs after resuming mid-round");
    }
}

#[test]
fn recipes_ddpo_cannot_run_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (&["--set", "sampler.eta=0.0"], "eta > 0"),
        (&["--set", "ddpo.samples_per_round=5"], "multiple of"),
        (&["--set", "ddpo.timestep_fraction=0"], "timestep_fraction"),
    ];
    for (i, (extra, want)) in cases.iter().enumerate() {
        let out = train(&tmp.path().join(format!("r{i}")), 2, extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
    }
}
