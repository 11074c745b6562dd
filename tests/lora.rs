//! LoRA: linear sites against the models, file dialects against diffusers + peft on tiny
//! random models (`tests/python/lora_fixtures.py`), merged vs unmerged, files out loaded by
//! diffusers, broken files refused by name, and training with LoRA through `softalign train`.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::Fixtures;
use softalign_backbones::clip::TextEncoder;
use softalign_backbones::sd3::Sd3Spec;
use softalign_backbones::unet::UNetSpec;
use softalign_core::adapter::lora::merge::{self, WeightTarget};
use softalign_core::adapter::lora::{files, Lora, LoraSpec};
use softalign_core::adapter::{Adapter, Injection, TokenSelection};
use softalign_core::backbone::{Backbone, Conditioning};
use softalign_core::plugin::{AdapterSpec, BackboneSpec, BuildContext};
use softalign_core::tensors::save_safetensors;
use tch::{Device, Kind, Tensor};

/// fp32 on tiny models; errors are reported relative to the output's largest value.
const TOL: f64 = 1e-5;

static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| Fixtures::new("lora_fixtures.py"))
}

fn case(name: &str) -> PathBuf {
    fixtures().root.join(name)
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    d / b.abs().max().double_value(&[]).max(1.0)
}

fn sd3(name: &str) -> Box<dyn Backbone> {
    Sd3Spec::from_path(case(name).join("model"))
        .build(&BuildContext::cpu("."))
        .unwrap()
}

fn unet(name: &str) -> Box<dyn Backbone> {
    UNetSpec::from_path(case(name).join("model"))
        .build(&BuildContext::cpu("."))
        .unwrap()
}

fn forward(b: &dyn Backbone, io: &BTreeMap<String, Tensor>, hook: Option<&Injection>) -> Tensor {
    // SD3 takes `hidden_states`, the UNet `sample`.
    let x = io.get("hidden_states").unwrap_or_else(|| &io["sample"]);
    let mut cond = Conditioning::new();
    for n in &b.info().conditioning {
        cond = cond.with(n, io[n].shallow_clone());
    }
    let _g = tch::no_grad_guard();
    b.forward(
        x,
        &io["timestep"],
        &cond,
        hook.map(|h| h as &dyn softalign_core::site::SiteHook),
    )
    .unwrap()
}

/// Checks `file` on the SD3 fixture `name`: merged, and (when `unmerged`) at the linear sites.
fn sd3_parity(name: &str, file: &Path, unmerged: bool) -> (f64, Option<f64>) {
    let io = fixtures().io(name);
    let want = &io["sample"];
    let b = sd3(name);
    let w = merge::read_for(b.as_ref(), file).unwrap();
    let un = unmerged.then(|| {
        let l = Lora::from_weights(&w, b.info(), 1.0).unwrap();
        let adapters: Vec<Box<dyn Adapter>> = vec![Box::new(l)];
        let inj = Injection {
            adapters: &adapters,
            selection: TokenSelection::default(),
        };
        rel_err(&forward(b.as_ref(), &io, Some(&inj)), want)
    });
    let before = forward(b.as_ref(), &io, None);
    assert!(
        rel_err(&before, want) > 1e-3,
        "{name}: the LoRA changes nothing"
    );
    merge::merge(&w, &b.weight_targets(), 1.0).unwrap();
    let merged = rel_err(&forward(b.as_ref(), &io, None), want);
    println!(
        "{name} {}: merged {merged:.2e}, unmerged {un:?}",
        file.display()
    );
    (merged, un)
}

#[test]
fn sd3_peft_folder_matches_peft_merged_and_unmerged() {
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (m, u) = sd3_parity("sd3", &case("sd3").join("peft"), true);
    assert!(m < TOL && u.unwrap() < TOL, "{m} {u:?}");
}

#[test]
fn sd3_diffusers_file_with_metadata_matches() {
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let f = case("sd3").join("diffusers");
    let b = sd3("sd3");
    let w = merge::read_for(b.as_ref(), &f).unwrap();
    assert_eq!(w.dialect, files::Dialect::Diffusers);
    // r 4, alpha 8 from the header's lora_adapter_metadata.
    assert!(w.entries.iter().all(|e| (e.scale - 2.0).abs() < 1e-12));
    let (m, _) = sd3_parity("sd3", &f, false);
    assert!(m < TOL, "{m}");
}

#[test]
fn sd3_rslora_and_dora_files_match() {
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (m, u) = sd3_parity("sd3_rslora", &case("sd3_rslora").join("peft"), true);
    assert!(m < TOL && u.unwrap() < TOL, "rslora {m} {u:?}");
    let (m, _) = sd3_parity("sd3_dora", &case("sd3_dora").join("peft"), false);
    assert!(m < TOL, "dora {m}");
}

/// DoRA trained here: the magnitudes start at the frozen weights' row norms as PEFT's do; with
/// PEFT's tensors loaded, the forward and the gradients of A, B and the magnitude equal PEFT's
/// (`dora_train.safetensors`); the exported PEFT folder merges back to the same output.
#[test]
fn dora_trains_as_peft_does_and_its_export_merges_back() {
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let io = fixtures().io("sd3_dora");
    let want = &io["sample"];
    let fx = softalign_core::tensors::MappedSafetensors::open(
        case("sd3_dora").join("dora_train.safetensors"),
    )
    .unwrap()
    .all()
    .unwrap();
    let b = sd3("sd3_dora");
    let spec: LoraSpec = toml::from_str("rank = 4\nalpha = 8.0\nuse_dora = true").unwrap();
    let mut lora = spec.build(b.info(), &BuildContext::cpu(".")).unwrap();
    lora.bind_weights(b.var_store()).unwrap();
    let mut inits = 0;
    for (n, t) in lora.trainable() {
        if let Some(w) = fx.get(&format!("init.{n}")) {
            assert!(
                rel_err(&t, w) < TOL,
                "{n}: initial magnitude differs from PEFT's"
            );
            inits += 1;
        }
    }
    assert_eq!(inits, 23, "one magnitude per adapted Linear");
    let state: BTreeMap<String, Tensor> = fx
        .iter()
        .filter(|(k, _)| k.starts_with("default."))
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    assert_eq!(state.len(), 3 * 23);
    lora.load_state(&state).unwrap();
    let adapters: Vec<Box<dyn Adapter>> = vec![lora];
    let inj = Injection {
        adapters: &adapters,
        selection: TokenSelection::default(),
    };
    let mut cond = Conditioning::new();
    for n in &b.info().conditioning {
        cond = cond.with(n, io[n].shallow_clone());
    }
    let out = b
        .forward(&io["hidden_states"], &io["timestep"], &cond, Some(&inj))
        .unwrap();
    let fwd = rel_err(&out, want);
    (out * &fx["R"]).sum(Kind::Float).backward();
    let mut worst: f64 = 0.0;
    for (n, p) in adapters[0].trainable() {
        let g = &fx[&format!("grad.{n}")];
        worst = worst.max(rel_err(&p.grad(), g));
    }
    let gmax = adapters[0]
        .trainable()
        .iter()
        .map(|(_, p)| p.grad().abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    let plain = rel_err(&forward(b.as_ref(), &io, None), want);
    println!(
        "dora training: forward {fwd:.2e} (without the adapter {plain:.2e}), gradients \
         {worst:.2e} (largest {gmax:.2e})"
    );
    assert!(
        plain > 1e-3 && gmax > 0.0,
        "the DoRA fixture changes nothing"
    );
    assert!(fwd < TOL && worst < TOL, "forward {fwd}, gradients {worst}");
    // Out as a PEFT folder (use_dora, lora_magnitude_vector), read and merged here.
    let dir = tempfile::tempdir().unwrap();
    adapters[0].export(dir.path()).unwrap();
    let cfg = std::fs::read_to_string(dir.path().join("peft/adapter_config.json")).unwrap();
    assert!(cfg.contains("\"use_dora\": true"), "{cfg}");
    let fresh = sd3("sd3_dora");
    let w = merge::read_for(fresh.as_ref(), &dir.path().join("peft")).unwrap();
    assert!(w.entries.iter().all(|e| e.magnitude.is_some()));
    merge::merge(&w, &fresh.weight_targets(), 1.0).unwrap();
    let merged = rel_err(&forward(fresh.as_ref(), &io, None), want);
    assert!(merged < TOL, "exported DoRA merged: {merged}");
}

fn unet_parity(name: &str, file: &str) -> f64 {
    let io = fixtures().io(name);
    let b = unet(name);
    let w = merge::read_for(b.as_ref(), &case(name).join(file)).unwrap();
    merge::merge(&w, &b.weight_targets(), 1.0).unwrap();
    let e = rel_err(&forward(b.as_ref(), &io, None), &io["expected"]);
    println!("{name} {file} ({}): merged {e:.2e}", w.dialect);
    e
}

#[test]
fn unet_diffusers_processor_and_kohya_files_match() {
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    for (file, dialect) in [
        (
            "pytorch_lora_weights.safetensors",
            files::Dialect::Diffusers,
        ),
        ("processor.bin", files::Dialect::Processor),
        ("kohya.safetensors", files::Dialect::Kohya),
    ] {
        let b = unet("unet");
        let w = merge::read_for(b.as_ref(), &case("unet").join(file)).unwrap();
        assert_eq!(w.dialect, dialect, "{file}");
        let e = unet_parity("unet", file);
        assert!(e < TOL, "{file}: {e}");
    }
}

#[test]
fn sdxl_kohya_sgm_names_match() {
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let e = unet_parity("sdxl", "kohya_sgm.safetensors");
    assert!(e < TOL, "{e}");
}

#[test]
fn clip_text_encoder_kohya_file_matches() {
    let dir = case("clip");
    let te = TextEncoder::load(dir.join("model"), Device::Cpu, Kind::Float).unwrap();
    let targets = [WeightTarget {
        component: "text_encoder".into(),
        vs: te.vs(),
        prefix: String::new(),
    }];
    let ctx = merge::read_context(&targets, None);
    let w = files::read(&dir.join("kohya_te.safetensors"), &ctx).unwrap();
    assert_eq!(w.entries.len(), 2 * 6);
    merge::merge(&w, &targets, 1.0).unwrap();
    let io = fixtures().io("clip");
    let out = te.encode(&io["input_ids"]).unwrap().last_hidden_state;
    let e = rel_err(&out, &io["last_hidden_state"]);
    println!("clip kohya te: {e:.2e}");
    assert!(e < TOL, "{e}");
}

// ---- files out --------------------------------------------------------------------------

/// A trained-looking LoRA (B random) on the SD3 fixture, written to `dir` as softalign's
/// `final/` would hold it; returns the unmerged output on the fixture's inputs.
fn exported(dir: &Path) -> Tensor {
    let b = sd3("sd3");
    let spec: LoraSpec =
        toml::from_str("rank = 4\nalpha = 8.0\nblocks = \"transformer_blocks[0..2]\"").unwrap();
    let lora = spec.build(b.info(), &BuildContext::cpu(".")).unwrap();
    {
        let _g = tch::no_grad_guard();
        for (n, mut t) in lora.trainable() {
            if n.ends_with("lora_B.weight") {
                t.copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    }
    lora.export(dir).unwrap();
    let adapters = vec![lora];
    let inj = Injection {
        adapters: &adapters,
        selection: TokenSelection::default(),
    };
    forward(b.as_ref(), &fixtures().io("sd3"), Some(&inj))
}

#[test]
fn written_files_load_in_diffusers_and_back_here() {
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(3);
    let dir = tempfile::tempdir().unwrap();
    let out = exported(dir.path());
    let base = forward(sd3("sd3").as_ref(), &fixtures().io("sd3"), None);
    assert!(
        rel_err(&out, &base) > 1e-3,
        "the exported LoRA changes nothing"
    );
    // Back in softalign: the diffusers file and the PEFT folder give the same output merged.
    for f in ["pytorch_lora_weights.safetensors", "peft"] {
        let b = sd3("sd3");
        let w = merge::read_for(b.as_ref(), &dir.path().join(f)).unwrap();
        merge::merge(&w, &b.weight_targets(), 1.0).unwrap();
        let e = rel_err(&forward(b.as_ref(), &fixtures().io("sd3"), None), &out);
        assert!(e < TOL, "{f}: {e}");
    }
    // In diffusers: load_lora_weights' own path (lora_state_dict + load_lora_into_transformer).
    std::fs::copy(
        case("sd3").join("io.safetensors"),
        dir.path().join("io.safetensors"),
    )
    .unwrap();
    std::os::unix::fs::symlink(case("sd3").join("model"), dir.path().join("model")).unwrap();
    common::run_python("lora_load_check.py", dir.path());
    let py =
        softalign_core::tensors::MappedSafetensors::open(dir.path().join("py_out.safetensors"))
            .unwrap()
            .tensor("sample")
            .unwrap();
    let e = rel_err(&py, &out);
    println!("diffusers load_lora_weights of our file: {e:.2e}");
    assert!(e < TOL, "{e}");
}

// ---- training with LoRA -------------------------------------------------------------------

fn tiny_sd3() -> softalign_backbones::sd3::Sd3Config {
    softalign_backbones::sd3::Sd3Config {
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

/// A tiny SD3 folder written by softalign and six encoded examples.
fn training_fixture(dir: &Path) {
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(0);
    let noise = softalign_backbones::sd3::FlowMatch::new(Default::default(), 1.0).unwrap();
    let model = softalign_backbones::sd3::Sd3Backbone::random(
        &tiny_sd3(),
        Device::Cpu,
        softalign_core::dtype::DType::F32,
        noise,
    )
    .unwrap();
    model.save_pretrained(&dir.join("model")).unwrap();
    let n = 6;
    let o = (Kind::Float, Device::Cpu);
    let data = vec![
        ("x0".to_string(), Tensor::randn([n, 4, 8, 8], o)),
        (
            "encoder_hidden_states".to_string(),
            Tensor::randn([n, 5, 12], o),
        ),
        ("pooled_projections".to_string(), Tensor::randn([n, 10], o)),
    ];
    save_safetensors(dir.join("data.safetensors"), &data, &Default::default()).unwrap();
}

fn recipe(adapters: &str, objectives: &str, steps: u64) -> String {
    format!(
        r#"
name = "lora-tiny"
seed = 3
[backbone]
type = "sd3"
path = "model"
{adapters}
{objectives}
[data]
type = "tensor_file"
path = "data.safetensors"
[train]
steps = {steps}
images_per_step = 3
lr = 2e-2
log_every = 1
checkpoint = {{ every = 2, keep = 2 }}
"#
    )
}

const LORA: &str = r#"
[[adapter]]
type = "lora"
rank = 4
alpha = 4.0
blocks = "transformer_blocks[0..2]"
"#;

fn softalign(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn train(dir: &Path, name: &str, text: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let r = dir.join(format!("{name}.toml"));
    std::fs::write(&r, text).unwrap();
    let run = dir.join(name);
    let mut args = vec![
        "train",
        "--quiet",
        "--recipe",
        r.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (ok, err) = softalign(&args);
    assert!(ok, "{name}: {err}");
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Mean of `key` over the first and the last `k` logged steps.
fn first_last(m: &[serde_json::Value], key: &str, k: usize) -> (f64, f64) {
    let v: Vec<f64> = m.iter().map(|x| x[key].as_f64().unwrap()).collect();
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (mean(&v[..k]), mean(&v[v.len() - k..]))
}

#[test]
fn contrastive_dsm_and_agsm_each_lower_their_loss_with_lora() {
    let dir = tempfile::tempdir().unwrap();
    training_fixture(dir.path());
    let agsm_lora =
        format!("{LORA}sets = [\"positive\", \"negative\"]\nema = true\nema_decay = 0.9\n");
    let cases = [
        (
            "contrastive",
            LORA.to_string(),
            "[[objective]]\ntype = \"softrepa_contrastive\"\ntemperature = 20.0\n",
            "softrepa_contrastive",
        ),
        (
            "dsm",
            LORA.to_string(),
            "[[objective]]\ntype = \"dsm\"\n",
            "dsm",
        ),
        (
            "agsm",
            agsm_lora,
            "[[objective]]\ntype = \"agsm\"\npositive = \"positive\"\nnegative = \"negative\"\n",
            "agsm",
        ),
    ];
    for (name, adapter, objective, key) in cases {
        let m = train(dir.path(), name, &recipe(&adapter, objective, 30), &[]);
        let key = if m[0].get(key).is_some() { key } else { "loss" };
        let (a, b) = first_last(&m, key, 8);
        println!("{name}: {key} {a:.4} -> {b:.4}");
        assert!(b < a, "{name}: {key} did not fall ({a} -> {b})");
        // final/ holds the adapter and the files other tools load.
        let fin = dir.path().join(name).join("final");
        for f in [
            "adapter.safetensors",
            "pytorch_lora_weights.safetensors",
            "peft/adapter_config.json",
        ] {
            assert!(fin.join(f).is_file(), "{name}: final/{f}");
        }
    }
}

#[test]
fn lora_and_tokens_train_together_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    training_fixture(dir.path());
    let both = format!(
        "{LORA}\n[[adapter]]\ntype = \"soft_tokens\"\ntokens = 2\nsites = \"joint_blocks[0..2]\"\ntoken_space = \"context\"\n"
    );
    let text = recipe(&both, "[[objective]]\ntype = \"softrepa_contrastive\"\n[[objective]]\ntype = \"dsm\"\nweight = 0.5\n", 6);
    train(dir.path(), "straight", &text, &[]);
    // Stopped after 4 steps, then resumed to 6.
    train(
        dir.path(),
        "resumed",
        &text.replace("steps = 6", "steps = 4"),
        &[],
    );
    let m = train(
        dir.path(),
        "resumed",
        &text,
        &["--resume", "latest", "--allow-recipe-change"],
    );
    assert_eq!(m.len(), 6);
    let read = |run: &str, f: &str| {
        softalign_core::tensors::MappedSafetensors::open(dir.path().join(run).join("final").join(f))
            .unwrap()
            .all()
            .unwrap()
    };
    for f in ["adapter0.safetensors", "adapter1.safetensors"] {
        let (a, b) = (read("straight", f), read("resumed", f));
        assert_eq!(a.len(), b.len());
        for (n, t) in &a {
            assert!(t.equal(&b[n]), "{f}: {n} differs after resume");
        }
    }
    // The LoRA's B moved away from zero.
    let a = read("straight", "adapter0.safetensors");
    assert!(a
        .iter()
        .any(|(n, t)| n.ends_with("lora_B.weight") && t.abs().max().double_value(&[]) > 0.0));
}

#[test]
fn only_lora_tensors_get_gradients_and_frozen_weights_stay() {
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(1);
    let noise = softalign_backbones::sd3::FlowMatch::new(Default::default(), 1.0).unwrap();
    let b = softalign_backbones::sd3::Sd3Backbone::random(
        &tiny_sd3(),
        Device::Cpu,
        softalign_core::dtype::DType::F32,
        noise,
    )
    .unwrap();
    let before: Vec<(String, Tensor)> = b
        .var_store()
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect();
    let spec: LoraSpec = toml::from_str("rank = 2\ndropout = 0.1").unwrap();
    let lora = spec.build(b.info(), &BuildContext::cpu(".")).unwrap();
    // B = 0 at the start: the adapter changes nothing until it trains.
    let o = (Kind::Float, Device::Cpu);
    let cond = Conditioning::new()
        .with("encoder_hidden_states", Tensor::randn([2, 5, 12], o))
        .with("pooled_projections", Tensor::randn([2, 10], o));
    let x = Tensor::randn([2, 4, 8, 8], o);
    let t = Tensor::from_slice(&[10.0f32, 900.0]);
    let plain = b.forward(&x, &t, &cond, None).unwrap();
    let adapters: Vec<Box<dyn Adapter>> = vec![lora];
    let inj = Injection {
        adapters: &adapters,
        selection: TokenSelection::default(),
    };
    let out = b.forward(&x, &t, &cond, Some(&inj)).unwrap();
    assert!(out.allclose(&plain, 0.0, 1e-7, false));
    out.square().sum(Kind::Float).backward();
    for (n, v) in b.var_store().variables() {
        assert!(
            !v.requires_grad() && !v.grad().defined(),
            "{n} is not frozen"
        );
    }
    let trainable = adapters[0].trainable();
    // The eight projections of blocks 0..3 (the last has no to_add_out): 23 pairs.
    assert_eq!(trainable.len(), 2 * 23);
    for (n, p) in &trainable {
        assert!(p.grad().defined(), "{n} got no gradient");
        // The last block's context queries only make the context output it discards.
        if n.ends_with("lora_B.weight") && !n.contains("blocks.2.attn.add_q_proj") {
            assert!(
                p.grad().abs().max().double_value(&[]) > 0.0,
                "{n}: zero gradient"
            );
        }
    }
    for (n, t) in before {
        assert!(t.equal(&b.var_store().variables()[&n]), "{n} changed");
    }
}

// ---- broken and mismatched files ----------------------------------------------------------

fn random_sd3() -> Box<dyn Backbone> {
    let noise = softalign_backbones::sd3::FlowMatch::new(Default::default(), 1.0).unwrap();
    Box::new(
        softalign_backbones::sd3::Sd3Backbone::random(
            &tiny_sd3(),
            Device::Cpu,
            softalign_core::dtype::DType::F32,
            noise,
        )
        .unwrap(),
    )
}

fn z(shape: &[i64]) -> Tensor {
    Tensor::zeros(shape, (Kind::Float, Device::Cpu))
}

fn write(dir: &Path, name: &str, t: Vec<(&str, Tensor)>) -> PathBuf {
    let p = dir.join(name);
    let t: Vec<(String, Tensor)> = t.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    save_safetensors(&p, &t, &Default::default()).unwrap();
    p
}

/// A torch.save-style zip whose pickle imports `os.system` (which `torch.load` would run).
fn malicious_bin(path: &Path) {
    use std::io::Write;
    let f = std::fs::File::create(path).unwrap();
    let mut zw = zip::ZipWriter::new(f);
    let opts =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zw.start_file("archive/data.pkl", opts).unwrap();
    // protocol 2: GLOBAL os.system, the argument tuple ("true",), REDUCE, STOP
    zw.write_all(b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
        .unwrap();
    zw.finish().unwrap();
}

#[test]
fn broken_and_mismatched_files_are_refused_by_name() {
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(2);
    let b = random_sd3();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = "transformer.transformer_blocks.0.attn.to_q";
    let truncated = {
        let p = write(
            d,
            "full.safetensors",
            vec![
                (&*format!("{q}.lora_A.weight"), z(&[4, 16])),
                (&*format!("{q}.lora_B.weight"), z(&[16, 4])),
            ],
        );
        let bytes = std::fs::read(&p).unwrap();
        let t = d.join("truncated.safetensors");
        std::fs::write(&t, &bytes[..bytes.len() / 2]).unwrap();
        t
    };
    let pickle = d.join("evil.bin");
    malicious_bin(&pickle);
    let qa = |s: &str| format!("{q}.{s}");
    let cases: [(&str, PathBuf, &[&str]); 12] = [
        (
            "unknown module",
            write(d, "unknown.safetensors", vec![
                ("transformer.transformer_blocks.0.attn.to_qq.lora_A.weight", z(&[4, 16])),
                ("transformer.transformer_blocks.0.attn.to_qq.lora_B.weight", z(&[16, 4])),
            ]),
            &["to_qq.lora_A.weight", "nearest", "transformer_blocks.0.attn.to_q`"],
        ),
        (
            "rank mismatch",
            write(d, "rank.safetensors", vec![(&*qa("lora_A.weight"), z(&[4, 16])), (&*qa("lora_B.weight"), z(&[16, 3]))]),
            &["rank mismatch", "to_q.lora_A.weight"],
        ),
        (
            "wrong in size",
            write(d, "in.safetensors", vec![(&*qa("lora_A.weight"), z(&[4, 7])), (&*qa("lora_B.weight"), z(&[16, 4]))]),
            &["to_q.lora_A.weight", "[16, 16]"],
        ),
        (
            "wrong out size",
            write(d, "out.safetensors", vec![(&*qa("lora_A.weight"), z(&[4, 16])), (&*qa("lora_B.weight"), z(&[9, 4]))]),
            &["to_q.lora_A.weight", "do not fit"],
        ),
        (
            "mixed dialects",
            write(d, "mixed.safetensors", vec![
                (&*qa("lora_A.weight"), z(&[4, 16])),
                (&*qa("lora_B.weight"), z(&[16, 4])),
                ("lora_unet_transformer_blocks_0_attn_to_k.lora_down.weight", z(&[4, 16])),
            ]),
            &["mixes LoRA dialects", "kohya"],
        ),
        ("truncated file", truncated, &["truncated.safetensors", "not a valid safetensors"]),
        ("pickle running code", pickle, &["evil.bin", "os.system"]),
        (
            "a LoRA for another model",
            write(d, "unet.safetensors", vec![
                ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight", z(&[4, 16])),
                ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight", z(&[16, 4])),
            ]),
            &["is for `unet`", "another model", "attn1.to_q.lora.down.weight"],
        ),
        (
            "B without A",
            write(d, "half.safetensors", vec![(&*qa("lora_B.weight"), z(&[16, 4]))]),
            &["transformer_blocks.0.attn.to_q", "no down/A"],
        ),
        (
            "not a LoRA key",
            write(d, "plain.safetensors", vec![("transformer_blocks.0.attn.to_q.weight", z(&[16, 16]))]),
            &["transformer_blocks.0.attn.to_q.weight", "no LoRA key"],
        ),
        (
            "kohya name matching nothing",
            write(d, "kohya.safetensors", vec![
                ("lora_unet_transformer_blocks_0_attn_to_qz.lora_down.weight", z(&[4, 16])),
                ("lora_unet_transformer_blocks_0_attn_to_qz.lora_up.weight", z(&[16, 4])),
            ]),
            &["to_qz.lora_down.weight", "nearest", "transformer_blocks.0.attn.to_q`"],
        ),
        ("missing file", d.join("nope.safetensors"), &["nope.safetensors", "not found"]),
    ];
    assert!(cases.len() >= 10);
    let weights_before = b.var_store().variables()["transformer_blocks.0.attn.to_q.weight"].copy();
    for (what, path, needles) in cases {
        let err = merge::read_for(b.as_ref(), &path)
            .and_then(|w| merge::merge(&w, &b.weight_targets(), 1.0))
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"))
            .to_string();
        for n in needles.iter() {
            assert!(err.contains(n), "{what}: `{n}` not in: {err}");
        }
    }
    assert!(
        weights_before.equal(&b.var_store().variables()["transformer_blocks.0.attn.to_q.weight"])
    );
}

// ---- linear sites -------------------------------------------------------------------------

fn sorted(mut v: Vec<(String, i64, i64)>) -> Vec<(String, i64, i64)> {
    v.sort();
    v
}

#[test]
fn linear_site_lists_match_the_layers_the_models_build() {
    use softalign_core::linear_site::collect;
    let vs = tch::nn::VarStore::new(Device::Cpu);
    for cfg in [
        tiny_sd3(),
        softalign_backbones::sd3::Sd3Config {
            qk_norm: Some("rms_norm".into()),
            dual_attention_layers: vec![0, 1],
            ..tiny_sd3()
        },
    ] {
        let (_, built) = collect(|| {
            softalign_backbones::sd3::transformer::Sd3Transformer2DModel::new(vs.root(), &cfg)
                .unwrap()
        });
        assert_eq!(
            sorted(built),
            sorted(softalign_backbones::sd3::transformer::linear_shapes(&cfg))
        );
    }
    let mut sd15 = softalign_backbones::unet::UNetConfig::sd15();
    sd15.block_out_channels = vec![32, 64];
    sd15.down_block_types = vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()];
    sd15.up_block_types = vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()];
    sd15.norm_num_groups = Some(8);
    let sdxl = softalign_backbones::unet::UNetConfig::preset("sdxl").unwrap();
    {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let (_, built) = collect(|| {
            softalign_backbones::unet::UNet2DConditionModel::new(vs.root(), &sd15).unwrap()
        });
        assert_eq!(
            sorted(built),
            sorted(softalign_backbones::unet::unet_2d_condition::linear_shapes(&sd15).unwrap())
        );
    }
    // SDXL is too big to build here; its list at least has every attention projection.
    let l = softalign_backbones::unet::unet_2d_condition::linear_shapes(&sdxl).unwrap();
    assert_eq!(
        l.iter()
            .filter(|(p, _, _)| p.ends_with("attn2.to_k"))
            .count(),
        70
    );
}

// ---- recipes -----------------------------------------------------------------------------

/// SoftREPA Table 11's LoRA rows on the SD3-medium preset (inner width 1536): r (1536 + 1536)
/// per adapted projection, eight per block (seven in the last, which has no to_add_out).
#[test]
fn recipe_check_prints_the_table_11_parameter_counts() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("recipes");
    for (file, want) in [
        ("sd3-lora-contrastive.toml", 5 * 8 * 4 * 3072),
        ("sd3-lora-r8-blocks5.toml", 5 * 8 * 8 * 3072),
        ("sd3-lora-r4-blocks10.toml", 10 * 8 * 4 * 3072),
        ("sd3-lora-r4-all.toml", (23 * 8 + 7) * 4 * 3072),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_softalign"))
            .args(["recipe", "check"])
            .arg(root.join(file))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{file}: {err}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let got = json["trainable_parameters"][0]["parameters"]
            .as_i64()
            .unwrap();
        println!("{file}: {got} trainable parameters");
        assert_eq!(got, want, "{file}");
        assert!(err.contains("trainable parameters"), "{err}");
    }
}

// ---- command line -------------------------------------------------------------------------

/// `lora merge` writes a folder whose forward equals `forward --lora` (merged at load) and
/// `forward --lora --unmerged` (at the linear sites).
#[test]
fn lora_merge_and_forward_lora_agree() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    training_fixture(d);
    {
        let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(4);
        let b = Sd3Spec::from_path(d.join("model"))
            .build(&BuildContext::cpu("."))
            .unwrap();
        let spec: LoraSpec = toml::from_str("rank = 2\nalpha = 4.0").unwrap();
        let lora = spec.build(b.info(), &BuildContext::cpu(".")).unwrap();
        let _ng = tch::no_grad_guard();
        for (n, mut t) in lora.trainable() {
            if n.ends_with("lora_B.weight") {
                t.copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
        lora.export(&d.join("lora")).unwrap();
        let o = (Kind::Float, Device::Cpu);
        let inputs = vec![
            ("hidden_states".to_string(), Tensor::randn([2, 4, 8, 8], o)),
            ("timestep".to_string(), Tensor::from_slice(&[5.0f32, 700.0])),
            (
                "encoder_hidden_states".to_string(),
                Tensor::randn([2, 5, 12], o),
            ),
            ("pooled_projections".to_string(), Tensor::randn([2, 10], o)),
        ];
        save_safetensors(d.join("in.safetensors"), &inputs, &Default::default()).unwrap();
    }
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    let file = s(d.join("lora/pytorch_lora_weights.safetensors"));
    let (ok, err) = softalign(&[
        "lora",
        "merge",
        "--backbone",
        "sd3",
        "--model",
        &s(d.join("model")),
        "--lora",
        &format!("{file}:0.5"),
        "--output",
        &s(d.join("merged")),
    ]);
    assert!(ok, "{err}");
    let run = |model: PathBuf, extra: &[&str], out: &str| {
        let mut args = vec![
            "forward".to_string(),
            "--device".into(),
            "cpu".into(),
            "--model".into(),
            s(model),
            "--inputs".into(),
            s(d.join("in.safetensors")),
            "--output".into(),
            s(d.join(out)),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, err) = softalign(&a);
        assert!(ok, "{err}");
        softalign_core::tensors::MappedSafetensors::open(d.join(out))
            .unwrap()
            .tensor("sample")
            .unwrap()
    };
    let half = format!("{file}:0.5");
    let merged = run(d.join("merged"), &[], "a.safetensors");
    let at_load = run(d.join("model"), &["--lora", &half], "b.safetensors");
    let unmerged = run(
        d.join("model"),
        &["--lora", &half, "--unmerged"],
        "c.safetensors",
    );
    let plain = run(d.join("model"), &[], "d.safetensors");
    assert!(rel_err(&plain, &merged) > 1e-4, "the LoRA changes nothing");
    for (what, t) in [("at load", &at_load), ("unmerged", &unmerged)] {
        let e = rel_err(t, &merged);
        println!("forward --lora {what} vs lora merge: {e:.2e}");
        assert!(e < TOL, "{what}: {e}");
    }
    // A recipe's `[backbone] loras`, paths relative to the recipe's folder, merges the same.
    let spec: Sd3Spec = toml::from_str(
        "path = \"model\"\n\
         loras = [{ path = \"lora/pytorch_lora_weights.safetensors\", scale = 0.5 }]\n",
    )
    .unwrap();
    let b = spec.build(&BuildContext::cpu(d)).unwrap();
    let io = softalign_core::tensors::MappedSafetensors::open(d.join("in.safetensors"))
        .unwrap()
        .all()
        .unwrap();
    let e = rel_err(&forward(b.as_ref(), &io, None), &merged);
    println!("[backbone] loras vs lora merge: {e:.2e}");
    assert!(e < TOL, "[backbone] loras: {e}");
}
