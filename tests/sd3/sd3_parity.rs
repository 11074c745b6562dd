//! SD3 parity against diffusers: tiny random SD3Transformer2DModel folders written by
//! `tests/python/sd3_fixtures.py` (run once per test binary), the soft-token injection against
//! a Python reference of SoftREPA's Algorithm 1, the `softalign forward` command, and the
//! FlowMatch Euler schedule against diffusers' scheduler.
use crate::common;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use softalign_backbones::schedulers::flow_match_euler::schedule;
use softalign_backbones::sd3::{FlowMatch, Sd3Backbone, Sd3Config, Sd3Spec, TimestepSampling};
use softalign_core::adapter::soft_tokens::SoftTokensSpec;
use softalign_core::adapter::{save_adapter, Adapter, Injection, TokenSelection};
use softalign_core::backbone::{Backbone, Conditioning};
use softalign_core::dtype::DType;
use softalign_core::plugin::{AdapterSpec, BackboneSpec, BuildContext};
use softalign_core::site::{SiteSelector, TokenSpace};
use softalign_core::tensors::MappedSafetensors;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

use crate::common::Fixtures;

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| Fixtures::new("sd3_fixtures.py"))
}

fn io(case: &str) -> BTreeMap<String, Tensor> {
    fixtures().io(case)
}

fn load(case: &str) -> Box<dyn Backbone> {
    let spec = Sd3Spec::from_path(fixtures().root.join(case).join("model"));
    spec.build(&BuildContext::cpu(".")).expect("load model")
}

fn cond(io: &BTreeMap<String, Tensor>) -> Conditioning {
    Conditioning::new()
        .with(
            "encoder_hidden_states",
            io["encoder_hidden_states"].shallow_clone(),
        )
        .with(
            "pooled_projections",
            io["pooled_projections"].shallow_clone(),
        )
}

fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn parity(case: &str) {
    let io = io(case);
    let bb = load(case);
    let _guard = tch::no_grad_guard();
    let out = bb
        .forward(&io["hidden_states"], &io["timestep"], &cond(&io), None)
        .expect("forward");
    let err = max_err(&out, &io["sample"]);
    let scale = io["sample"].abs().max().double_value(&[]);
    println!("sd3 parity `{case}`: max abs error {err:.3e} (output max |x| {scale:.2})");
    assert!(err <= TOL, "`{case}`: max abs error {err:e} > {TOL:e}");
}

#[test]
fn parity_plain_sd3() {
    parity("plain");
}

#[test]
fn parity_sd35_rms_qk_norm() {
    parity("sd35_rms");
}

#[test]
fn parity_sd35_dual_attention() {
    parity("dual");
}

#[test]
fn parity_non_square_latent() {
    parity("nonsquare");
}

#[test]
fn parity_null_pos_embed_max_size() {
    parity("no_max");
}

#[test]
fn parity_sharded_checkpoint() {
    let dir = fixtures().root.join("sharded/model");
    assert!(
        dir.join("diffusion_pytorch_model.safetensors.index.json")
            .is_file(),
        "the fixture should be sharded"
    );
    parity("sharded");
}

#[test]
fn positional_table_matches_diffusers() {
    for case in ["plain", "nonsquare", "dual"] {
        let cfg: Sd3Config =
            serde_json::from_value(fixtures().manifest[case]["config"].clone()).expect("config");
        let bb = Sd3Backbone::random(
            &cfg,
            Device::Cpu,
            DType::F32,
            FlowMatch::new(TimestepSampling::UniformInt, 1.0).unwrap(),
        )
        .unwrap();
        let err = max_err(
            bb.model().pos_embed().pos_embed().unwrap(),
            &io(case)["pos_embed"],
        );
        println!("sd3 pos_embed table `{case}`: max abs error {err:.3e}");
        assert!(err <= 1e-6, "`{case}`: table differs by {err:e}");
    }
}

fn token_spec(space: TokenSpace) -> SoftTokensSpec {
    let m = &fixtures().manifest["inject"];
    SoftTokensSpec {
        tokens: m["tokens"].as_i64().unwrap(),
        sites: SiteSelector::One(format!(
            "joint_blocks[0..{}]",
            m["blocks"].as_i64().unwrap()
        )),
        time_buckets: m["buckets"].as_i64().unwrap(),
        shared_time_row: false,
        shared_tokens: false,
        token_space: space,
        init: Default::default(),
        time_init_std: 0.02,
        sets: vec!["default".into()],
        ema: false,
        ema_decay: 0.9999,
        ema_init: Default::default(),
    }
}

fn adapter_for(
    bb: &dyn Backbone,
    space: TokenSpace,
    io: &BTreeMap<String, Tensor>,
) -> Box<dyn Adapter> {
    let name = match space {
        TokenSpace::Joint => "joint",
        TokenSpace::Context => "context",
    };
    let mut a = token_spec(space)
        .build(bb.info(), &BuildContext::cpu("."))
        .expect("adapter");
    let state = BTreeMap::from([
        (
            "default.tokens".to_string(),
            io[&format!("inject_{name}.tokens")].shallow_clone(),
        ),
        (
            "time_table".to_string(),
            io[&format!("inject_{name}.time_table")].shallow_clone(),
        ),
    ]);
    a.load_state(&state).expect("load tokens");
    a
}

fn injection(space: TokenSpace, name: &str) {
    let case = fixtures().manifest["inject"]["case"].as_str().unwrap();
    let io = io(case);
    let bb = load(case);
    let adapters = vec![adapter_for(bb.as_ref(), space, &io)];
    let inj = Injection {
        adapters: &adapters,
        selection: TokenSelection::default(),
    };
    let _guard = tch::no_grad_guard();
    let out = bb
        .forward(
            &io["hidden_states"],
            &io["timestep"],
            &cond(&io),
            Some(&inj),
        )
        .expect("forward");
    let want = &io[&format!("inject_{name}.sample")];
    let err = max_err(&out, want);
    let moved = max_err(want, &io["sample"]);
    println!("sd3 soft-token injection ({name} space): max abs error {err:.3e} (tokens move the output by {moved:.3})");
    assert!(
        moved > 1e-2,
        "the reference tokens should change the output"
    );
    assert!(err <= TOL, "{name}: max abs error {err:e} > {TOL:e}");
}

#[test]
fn soft_token_injection_joint_space() {
    injection(TokenSpace::Joint, "joint");
}

#[test]
fn soft_token_injection_context_space() {
    injection(TokenSpace::Context, "context");
}

#[test]
fn forward_command_matches_diffusers_with_and_without_adapter() {
    let case = fixtures().manifest["inject"]["case"].as_str().unwrap();
    let io = io(case);
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in.safetensors");
    let named: Vec<(String, Tensor)> = [
        "hidden_states",
        "timestep",
        "encoder_hidden_states",
        "pooled_projections",
    ]
    .iter()
    .map(|n| (n.to_string(), io[*n].shallow_clone()))
    .collect();
    softalign_core::tensors::save_safetensors(&inputs, &named, &BTreeMap::new()).unwrap();
    let bb = load(case);
    let adapter = adapter_for(bb.as_ref(), TokenSpace::Context, &io);
    let adapter_file = tmp.path().join("tokens.safetensors");
    save_adapter(&adapter_file, adapter.as_ref(), &BTreeMap::new()).unwrap();
    let model = fixtures().root.join(case).join("model");
    for (with_adapter, want) in [(false, "sample"), (true, "inject_context.sample")] {
        let output = tmp.path().join(format!("out{with_adapter}.safetensors"));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_softalign"));
        cmd.arg("forward")
            .arg("--model")
            .arg(&model)
            .arg("--inputs")
            .arg(&inputs)
            .arg("--output")
            .arg(&output)
            .args(["--device", "cpu"]);
        if with_adapter {
            cmd.arg("--adapter").arg(&adapter_file);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "softalign forward failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = MappedSafetensors::open(&output)
            .unwrap()
            .tensor("sample")
            .unwrap();
        let err = max_err(&got, &io[want]);
        println!("softalign forward (adapter: {with_adapter}): max abs error {err:.3e}");
        assert!(err <= TOL, "max abs error {err:e}");
    }
}

#[test]
fn flow_match_euler_schedule_matches_diffusers() {
    let all = fixtures().manifest["schedules"].as_object().unwrap();
    assert!(!all.is_empty());
    for (key, s) in all {
        let steps = s["steps"].as_u64().unwrap() as usize;
        let shift = s["shift"].as_f64().unwrap();
        let ours = schedule(steps, shift).unwrap();
        let cmp = |name: &str, ours: &[f32], theirs: &serde_json::Value| {
            let theirs: Vec<f32> = theirs
                .as_array()
                .unwrap()
                .iter()
                .map(|v| f32::from_bits(v.as_i64().unwrap() as i32 as u32))
                .collect();
            assert_eq!(ours.len(), theirs.len(), "{key} {name}: length");
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{key} {name}[{i}]: ours {a}, diffusers {b}"
                );
            }
        };
        cmp("timesteps", &ours.timesteps, &s["timesteps"]);
        cmp("sigmas", &ours.sigmas, &s["sigmas"]);
    }
    println!(
        "FlowMatch Euler schedules bit-identical to diffusers: {:?}",
        all.keys().collect::<Vec<_>>()
    );
}

/// `scripts/gpu-check.sh` in its smoke form on the CPU: the prepared GPU check runs end to end
/// (tiny folders, parity in f32 and bf16 within its bounds, the side-by-side speed table with
/// both columns filled), so a session that is lent a device finds it working.
#[test]
fn gpu_check_smoke_runs_on_the_cpu() {
    let out = tempfile::tempdir().unwrap();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let py = std::env::var("SOFTALIGN_PYTHON").unwrap_or_else(|_| "python3".into());
    let run = std::process::Command::new(root.join("scripts/gpu-check.sh"))
        .env("PYTHON", &py)
        .args([
            "--device",
            "cpu",
            "--smoke",
            "--bin",
            env!("CARGO_BIN_EXE_softalign"),
        ])
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "gpu-check failed:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let report = common::read_json(out.path(), "gpu-check.json");
    let parity = report["parity"].as_array().unwrap();
    assert_eq!(parity.len(), 8, "4 models x f32, bf16");
    for row in parity {
        assert_eq!(row["pass"], true, "{row}");
        if row["dtype"] == "f32" {
            assert!(row["sa_err"].as_f64().unwrap() < 2e-5, "{row}");
        }
    }
    let speed = &report["speed"][0];
    for side in ["softalign", "pytorch"] {
        let rows = speed[side]
            .as_array()
            .unwrap_or_else(|| panic!("no {side} rows: {speed}"));
        assert!(rows.len() >= 4, "{side}: {rows:?}");
        assert!(rows
            .iter()
            .all(|r| r["ms_per_step"].as_f64().unwrap() > 0.0));
    }
    let md = std::fs::read_to_string(out.path().join("gpu-check.md")).unwrap();
    assert!(md.contains("| training step: + soft tokens |"), "{md}");
}
