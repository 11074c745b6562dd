//! `softalign train` end to end on a tiny SD3 folder written by the project itself: a run
//! folder with metrics, checkpoints and a loadable adapter; `--resume latest` continuing it.
use std::path::Path;
use std::process::Command;

use softalign_backbones::sd3::config::Sd3Config;
use softalign_backbones::sd3::flow_match::FlowMatch;
use softalign_backbones::sd3::spec::{info, Sd3Backbone};
use softalign_core::adapter::load_adapter;
use softalign_core::backbone::Backbone;
use softalign_core::dtype::DType;
use softalign_core::tensors::save_safetensors;
use tch::{Device, Kind, Tensor};

fn tiny() -> Sd3Config {
    Sd3Config {
        sample_size: 8,
        patch_size: 2,
        in_channels: 4,
        num_layers: 3,
        attention_head_dim: 8,
        num_attention_heads: 2,
        joint_attention_dim: 12,
        caption_projection_dim: 16,
        pooled_projection_dim: 10,
        out_channels: Some(4),
        pos_embed_max_size: Some(8),
        dual_attention_layers: vec![],
        qk_norm: None,
    }
}

pub(crate) fn write_fixture(dir: &Path, steps: u64) {
    tch::manual_seed(0);
    let cfg = tiny();
    let noise = FlowMatch::new(Default::default(), 1.0).unwrap();
    let model = Sd3Backbone::random(&cfg, Device::Cpu, DType::F32, noise).unwrap();
    model.save_pretrained(&dir.join("model")).unwrap();
    let n = 6;
    let data = vec![
        (
            "x0".to_string(),
            Tensor::randn([n, 4, 8, 8], (Kind::Float, Device::Cpu)),
        ),
        (
            "encoder_hidden_states".to_string(),
            Tensor::randn([n, 5, 12], (Kind::Float, Device::Cpu)),
        ),
        (
            "pooled_projections".to_string(),
            Tensor::randn([n, 10], (Kind::Float, Device::Cpu)),
        ),
    ];
    save_safetensors(dir.join("data.safetensors"), &data, &Default::default()).unwrap();
    let recipe = format!(
        r#"
name = "tiny"
seed = 3
[backbone]
type = "sd3"
path = "model"
[[adapter]]
type = "soft_tokens"
tokens = 2
sites = "joint_blocks[0..2]"
time_buckets = 10
token_space = "context"
[[objective]]
type = "softrepa_contrastive"
[[objective]]
type = "dsm"
weight = 0.5
[data]
type = "tensor_file"
path = "data.safetensors"
[train]
steps = {steps}
images_per_step = 3
lr = 1e-2
checkpoint = {{ every = 2, keep = 2 }}
schedule = {{ type = "warm_restarts", t_0 = 2, every = 1 }}
"#
    );
    std::fs::write(dir.join("recipe.toml"), recipe).unwrap();
}

fn softalign(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn train_writes_a_run_folder_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_fixture(dir, 6);
    let recipe = dir.join("recipe.toml");
    let r = recipe.to_str().unwrap();

    // Straight: 6 steps.
    let straight = dir.join("straight");
    let (ok, err) = softalign(&[
        "train",
        "--recipe",
        r,
        "--run-dir",
        straight.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(ok, "{err}");
    for f in [
        "recipe.json",
        "command.txt",
        "versions.json",
        "seed",
        "metrics.jsonl",
        "final/adapter.safetensors",
    ] {
        assert!(straight.join(f).exists(), "run folder lacks {f}");
    }
    let metrics = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for key in ["loss", "softrepa_contrastive", "dsm", "lr", "grad_norm"] {
        assert!(
            lines[0].get(key).is_some(),
            "metrics.jsonl lacks `{key}`: {}",
            lines[0]
        );
    }
    // A second `train` into the same folder without --resume is refused, nothing is lost.
    let (ok, err) = softalign(&[
        "train",
        "--recipe",
        r,
        "--run-dir",
        straight.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(!ok && err.contains("--resume latest"), "{err}");

    // Interrupted: the same recipe with 4 steps, then resumed to 6 with the recipe changed.
    let resumed = dir.join("resumed");
    let rd = resumed.to_str().unwrap();
    let (ok, err) = softalign(&[
        "train",
        "--recipe",
        r,
        "--run-dir",
        rd,
        "--quiet",
        "--set",
        "train.steps=4",
    ]);
    assert!(ok, "{err}");
    let (ok, err) = softalign(&[
        "train",
        "--recipe",
        r,
        "--run-dir",
        rd,
        "--quiet",
        "--resume",
        "latest",
    ]);
    assert!(
        !ok && err.contains("different recipe"),
        "a changed recipe must be refused by default: {err}"
    );
    let (ok, err) = softalign(&[
        "train",
        "--recipe",
        r,
        "--run-dir",
        rd,
        "--quiet",
        "--resume",
        "latest",
        "--allow-recipe-change",
    ]);
    assert!(ok, "{err}");

    let cfg_info = info(&tiny());
    let a = load_adapter(
        &straight.join("final/adapter.safetensors"),
        &cfg_info,
        Device::Cpu,
    )
    .unwrap();
    let b = load_adapter(
        &resumed.join("final/adapter.safetensors"),
        &cfg_info,
        Device::Cpu,
    )
    .unwrap();
    for ((n1, t1), (_, t2)) in a.state().into_iter().zip(b.state()) {
        assert!(
            t1.equal(&t2),
            "{n1} differs between the straight and the resumed run"
        );
    }
    // The tokens moved away from their initialisation.
    let (ok, err) = softalign(&[
        "train",
        "--recipe",
        r,
        "--run-dir",
        dir.join("one").to_str().unwrap(),
        "--quiet",
        "--set",
        "train.steps=1",
    ]);
    assert!(ok, "{err}");
    let c = load_adapter(
        &dir.join("one/final/adapter.safetensors"),
        &cfg_info,
        Device::Cpu,
    )
    .unwrap();
    let moved = a.state()[0]
        .1
        .f_sub(&c.state()[0].1)
        .unwrap()
        .abs()
        .max()
        .double_value(&[]);
    assert!(moved > 1e-4, "tokens barely moved in 5 steps ({moved})");

    // The run's recipe.json (paths absolute) is a recipe: from another working directory it
    // repeats the run, and the adapter file is the same byte for byte.
    let again = dir.join("again");
    let out = Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(["train", "--quiet", "--recipe"])
        .arg(straight.join("recipe.json"))
        .arg("--run-dir")
        .arg(&again)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(straight.join("final/adapter.safetensors")).unwrap()
            == std::fs::read(again.join("final/adapter.safetensors")).unwrap(),
        "two identical runs wrote different adapter files"
    );
}
