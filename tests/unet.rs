//! UNet2DConditionModel (SD1.5 / SDXL / SD2-v) parity against diffusers on tiny random
//! configs written by `tests/python/unet_fixtures.py` (run once per test binary), token
//! insertion after BOS per block group against a Python reference, the Diffusion-DPO UNet
//! folder swap, `softalign forward` on UNet folders, DDIM and DDPM against diffusers'
//! schedulers, and the shipped UNet recipes. One file: every test binary links libtorch.
mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use common::Fixtures;
use softalign_backbones::schedulers::ddim::{timesteps, Ddim, DdimSpec, Spacing};
use softalign_backbones::schedulers::ddpm::{BetaConfig, DdpmNoise};
use softalign_backbones::unet::UNetSpec;
use softalign_core::adapter::soft_tokens::SoftTokensSpec;
use softalign_core::adapter::{load_adapter, save_adapter, Adapter, Injection, TokenSelection};
use softalign_core::backbone::{Backbone, Conditioning, NoiseProcess, Prediction};
use softalign_core::plugin::{AdapterSpec, BackboneSpec, BuildContext};
use softalign_core::site::{SiteSelector, TokenSpace};
use softalign_core::tensors::{save_safetensors, MappedSafetensors};
use tch::{Kind, Tensor};

const TOL: f64 = 1e-4;

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| Fixtures::new("unet_fixtures.py"))
}

fn io(case: &str) -> BTreeMap<String, Tensor> {
    fixtures().io(case)
}

fn folder(case: &str) -> PathBuf {
    let f = fixtures().manifest["cases"][case]["folder"]
        .as_str()
        .unwrap();
    fixtures().root.join(f)
}

fn build(spec: UNetSpec) -> Box<dyn Backbone> {
    spec.build(&BuildContext::cpu(".")).expect("load unet")
}

fn load(case: &str) -> Box<dyn Backbone> {
    build(UNetSpec::from_path(folder(case)))
}

const COND: [&str; 3] = ["encoder_hidden_states", "text_embeds", "time_ids"];

fn cond(io: &BTreeMap<String, Tensor>) -> Conditioning {
    let mut c = Conditioning::new();
    for n in COND {
        if let Some(t) = io.get(n) {
            c = c.with(n, t.shallow_clone());
        }
    }
    c
}

fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn forward(
    bb: &dyn Backbone,
    io: &BTreeMap<String, Tensor>,
    adapters: &[Box<dyn Adapter>],
) -> Tensor {
    let inj = Injection {
        adapters,
        selection: TokenSelection::default(),
    };
    let hook = (!adapters.is_empty()).then_some(&inj as &dyn softalign_core::site::SiteHook);
    let _guard = tch::no_grad_guard();
    bb.forward(&io["sample"], &io["timestep"], &cond(io), hook)
        .expect("forward")
}

fn parity(case: &str, model: &str) -> f64 {
    let io = io(case);
    let bb = load(model);
    let t = &io["timestep"];
    assert!(
        t.get(0).double_value(&[]) != t.get(1).double_value(&[]),
        "the fixture should use per-sample timesteps"
    );
    let out = forward(bb.as_ref(), &io, &[]);
    let err = max_err(&out, &io["out"]);
    let scale = io["out"].abs().max().double_value(&[]);
    println!("unet parity `{case}`: max abs error {err:.3e} (output max |x| {scale:.2})");
    assert!(err <= TOL, "`{case}`: max abs error {err:e} > {TOL:e}");
    err
}

#[test]
fn parity_sd15_like_conv_projections() {
    parity("sd15", "sd15");
}

#[test]
fn parity_sdxl_like_text_time_linear_per_block_layers_and_heads() {
    let bb = load("sdxl");
    assert_eq!(
        bb.info().conditioning,
        ["encoder_hidden_states", "text_embeds", "time_ids"]
    );
    parity("sdxl", "sdxl");
    // The added conditioning is used: other time ids change the output.
    let mut io = io("sdxl");
    let ids = io["time_ids"].ones_like() * 64.0;
    io.insert("time_ids".to_string(), ids);
    let moved = max_err(&forward(bb.as_ref(), &io, &[]), &io["out"]);
    assert!(moved > 1e-3, "time_ids had no effect ({moved:e})");
}

#[test]
fn parity_v_prediction_pipeline_folder() {
    let bb = load("sd2_vpred");
    // The pipeline's scheduler_config.json says v_prediction; the folder path is the pipeline.
    assert_eq!(bb.info().prediction, Prediction::VPrediction);
    parity("sd2_vpred", "sd2_vpred");
    let x0 = Tensor::randn([2, 4, 3, 3], (Kind::Float, tch::Device::Cpu));
    let eps = Tensor::randn([2, 4, 3, 3], (Kind::Float, tch::Device::Cpu));
    let t = Tensor::from_slice(&[10.0f32, 900.0]);
    let v = bb.noise().target(&x0, &eps, &t);
    assert!(max_err(&v, &eps) > 1e-2, "v target should differ from eps");
}

#[test]
fn parity_latent_not_divisible_by_the_downsampling() {
    parity("sd15_odd", "sd15");
}

#[test]
fn strict_loading_names_missing_and_unused_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = folder("sd15");
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let all = MappedSafetensors::open(src.join("diffusion_pytorch_model.safetensors"))
        .unwrap()
        .all()
        .unwrap();
    let mut kept: Vec<(String, Tensor)> = all
        .into_iter()
        .filter(|(k, _)| k != "conv_out.bias")
        .collect();
    kept.push((
        "extra.weight".into(),
        Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)),
    ));
    save_safetensors(
        tmp.path().join("diffusion_pytorch_model.safetensors"),
        &kept,
        &BTreeMap::new(),
    )
    .unwrap();
    let err = UNetSpec::from_path(tmp.path())
        .build(&BuildContext::cpu("."))
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("conv_out.bias") && err.contains("extra.weight"),
        "{err}"
    );
}

fn tokens_adapter(
    bb: &dyn Backbone,
    io: &BTreeMap<String, Tensor>,
    case: &str,
) -> Box<dyn Adapter> {
    let m = &fixtures().manifest["inject"][case];
    let groups: Vec<String> = m["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap().to_string())
        .collect();
    let table = m["time_table"].as_bool().unwrap();
    let spec = SoftTokensSpec {
        tokens: m["tokens"].as_i64().unwrap(),
        sites: SiteSelector::Many(groups),
        time_buckets: if table { 100 } else { 0 },
        shared_time_row: true,
        shared_tokens: false,
        token_space: TokenSpace::Joint,
        init: Default::default(),
        time_init_std: 0.02,
        sets: vec!["default".into()],
        ema: false,
        ema_decay: 0.9999,
        ema_init: Default::default(),
    };
    let mut a = spec
        .build(bb.info(), &BuildContext::cpu("."))
        .expect("adapter");
    let mut state = BTreeMap::from([("default.tokens".to_string(), io["tokens"].shallow_clone())]);
    if table {
        state.insert("time_table".into(), io["time_table"].shallow_clone());
    }
    a.load_state(&state).expect("tokens");
    a
}

fn injection(case: &str) {
    let io = io(case);
    let model = fixtures().manifest["inject"][case]["model"]
        .as_str()
        .unwrap();
    let bb = load(model);
    let adapters = vec![tokens_adapter(bb.as_ref(), &io, case)];
    let out = forward(bb.as_ref(), &io, &adapters);
    let err = max_err(&out, &io["out"]);
    let moved = max_err(&io["out"], &io["plain"]);
    println!("unet token insertion `{case}`: max abs error {err:.3e} (tokens move the output by {moved:.3})");
    assert!(
        moved > 1e-2,
        "the reference tokens should change the output"
    );
    assert!(err <= TOL, "`{case}`: max abs error {err:e} > {TOL:e}");
}

#[test]
fn token_insertion_after_bos_in_down_matches_reference() {
    injection("inject_sd15");
}

#[test]
fn token_insertion_after_bos_in_down_and_mid_with_time_table_matches_reference() {
    injection("inject_sdxl");
}

#[test]
fn unet_sites_are_the_cross_attention_groups() {
    let names = |case: &str| -> Vec<String> {
        load(case)
            .info()
            .sites
            .iter()
            .map(|s| s.name.clone())
            .collect()
    };
    assert_eq!(names("sd15"), ["down", "mid", "up"]);
    let bb = load("sd15");
    let bad = SoftTokensSpec {
        sites: SiteSelector::One("joint_blocks[0..5]".into()),
        ..serde_json::from_str(r#"{"tokens": 4, "sites": "down"}"#).unwrap()
    };
    let err = bad.validate(bb.info()).unwrap_err().to_string();
    assert!(err.contains("down, mid, up"), "{err}");
    let ctx_space: SoftTokensSpec =
        serde_json::from_str(r#"{"tokens": 4, "sites": "down", "token_space": "context"}"#)
            .unwrap();
    assert!(ctx_space.validate(bb.info()).is_err());
}

/// Diffusion-DPO releases a UNet folder; the swap takes it with everything else from the base.
fn swapped() -> Box<dyn Backbone> {
    build(UNetSpec {
        unet: Some(folder("dpo")),
        ..UNetSpec::from_path(folder("sd15"))
    })
}

#[test]
fn dpo_unet_swap_matches_the_swapped_unet_and_tokens_load_unchanged() {
    let base = load("sd15");
    let bb = swapped();
    let io_dpo = io("dpo");
    let out = forward(bb.as_ref(), &io_dpo, &[]);
    let err = max_err(&out, &io_dpo["out"]);
    let moved = max_err(&forward(base.as_ref(), &io_dpo, &[]), &io_dpo["out"]);
    println!("unet DPO swap: max abs error {err:.3e} (base vs swapped differ by {moved:.3})");
    assert!(moved > 1e-2, "the swapped UNet should differ from the base");
    assert!(err <= TOL, "swap: max abs error {err:e}");
    // Tokens trained on the base, saved, loaded unchanged onto the swapped UNet.
    let io = io("inject_dpo");
    let a = tokens_adapter(base.as_ref(), &io, "inject_sd15");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("tokens.safetensors");
    save_adapter(&file, a.as_ref(), &BTreeMap::new()).unwrap();
    let loaded = load_adapter(&file, bb.info(), tch::Device::Cpu).unwrap();
    let before = &a.state()[0].1;
    let after = &loaded.state()[0].1;
    assert_eq!(max_err(before, after), 0.0, "tokens changed on load");
    let out = forward(bb.as_ref(), &io, &[loaded]);
    let err = max_err(&out, &io["out"]);
    println!("unet DPO swap + base tokens: max abs error {err:.3e}");
    assert!(err <= TOL, "swap + tokens: max abs error {err:e}");
}

#[test]
fn swap_with_an_incompatible_unet_fails_naming_the_folder() {
    let err = UNetSpec {
        unet: Some(folder("sdxl")),
        ..UNetSpec::from_path(folder("sd15"))
    }
    .build(&BuildContext::cpu("."))
    .err()
    .expect("must fail")
    .to_string();
    assert!(
        err.contains("sdxl") && err.contains("does not fit"),
        "{err}"
    );
}

fn run_forward(args: &[&std::ffi::OsStr]) -> Tensor {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_softalign"))
        .arg("forward")
        .args(args)
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "softalign forward failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let i = args.iter().position(|a| *a == "--output").unwrap();
    MappedSafetensors::open(args[i + 1])
        .unwrap()
        .tensor("sample")
        .unwrap()
}

#[test]
fn forward_command_accepts_unet_folders_swap_and_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let write_inputs = |case: &str| {
        let io = io(case);
        let p = tmp.path().join(format!("{case}.in.safetensors"));
        let mut named = vec![
            ("sample".to_string(), io["sample"].shallow_clone()),
            ("timestep".to_string(), io["timestep"].shallow_clone()),
        ];
        for n in COND {
            if let Some(t) = io.get(n) {
                named.push((n.to_string(), t.shallow_clone()));
            }
        }
        save_safetensors(&p, &named, &BTreeMap::new()).unwrap();
        p
    };
    let output = tmp.path().join("out.safetensors");
    // SDXL-like: text_embeds and time_ids.
    let inp = write_inputs("sdxl");
    let model = folder("sdxl");
    let got = run_forward(&[
        "--model".as_ref(),
        model.as_os_str(),
        "--inputs".as_ref(),
        inp.as_os_str(),
        "--output".as_ref(),
        output.as_os_str(),
    ]);
    let err = max_err(&got, &io("sdxl")["out"]);
    println!("softalign forward (sdxl-like): max abs error {err:.3e}");
    assert!(err <= TOL);
    // Base + swapped UNet + tokens trained on the base.
    let io = io("inject_dpo");
    let base = load("sd15");
    let a = tokens_adapter(base.as_ref(), &io, "inject_sd15");
    let tokens = tmp.path().join("tokens.safetensors");
    save_adapter(&tokens, a.as_ref(), &BTreeMap::new()).unwrap();
    let inp = write_inputs("inject_dpo");
    let (model, swap) = (folder("sd15"), folder("dpo"));
    let got = run_forward(&[
        "--model".as_ref(),
        model.as_os_str(),
        "--unet".as_ref(),
        swap.as_os_str(),
        "--adapter".as_ref(),
        tokens.as_os_str(),
        "--inputs".as_ref(),
        inp.as_os_str(),
        "--output".as_ref(),
        output.as_os_str(),
    ]);
    let err = max_err(&got, &io["out"]);
    println!("softalign forward (DPO swap + tokens): max abs error {err:.3e}");
    assert!(err <= TOL);
}

fn spacing(s: &str) -> Spacing {
    serde_json::from_value(serde_json::Value::String(s.into())).unwrap()
}

fn ddim_spec(c: &serde_json::Value) -> DdimSpec {
    DdimSpec {
        steps: c["steps"].as_u64().unwrap() as usize,
        eta: c["eta"].as_f64().unwrap(),
        timestep_spacing: spacing(c["spacing"].as_str().unwrap()),
        steps_offset: c["offset"].as_i64().unwrap(),
        set_alpha_to_one: c["alpha_one"].as_bool().unwrap(),
        clip_sample: c["clip"].as_bool().unwrap(),
        rescale_betas_zero_snr: c["zsnr"].as_bool().unwrap_or(false),
        ..DdimSpec::default()
    }
}

#[test]
fn ddim_timesteps_match_diffusers() {
    let all = fixtures().manifest["ddim"].as_object().unwrap();
    assert!(all.len() >= 5);
    for (k, c) in all {
        let spec = ddim_spec(c);
        let ours = timesteps(spec.steps, 1000, spec.timestep_spacing, spec.steps_offset).unwrap();
        let theirs: Vec<i64> = c["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(ours, theirs, "config {k}: {c}");
    }
    // More spacings than the fixture holds, against numpy's arithmetic done by hand.
    assert_eq!(
        timesteps(3, 1000, Spacing::Trailing, 0).unwrap(),
        [999, 666, 332]
    );
    assert_eq!(
        timesteps(4, 1000, Spacing::Linspace, 0).unwrap(),
        [999, 666, 333, 0]
    );
    assert!(timesteps(10, 1000, Spacing::Leading, 200).is_err());
    assert!(timesteps(0, 1000, Spacing::Leading, 1).is_err());
}

#[test]
fn ddim_steps_match_diffusers() {
    let io = io("schedulers");
    let mut worst: f64 = 0.0;
    for (k, c) in fixtures().manifest["ddim"].as_object().unwrap() {
        let ddim = Ddim::new(&ddim_spec(c)).unwrap();
        let pred = match c["pred"].as_str().unwrap() {
            "epsilon" => Prediction::Epsilon,
            _ => Prediction::VPrediction,
        };
        for i in c["picks"].as_array().unwrap() {
            let i = i.as_u64().unwrap() as usize;
            let key = format!("{k}_{i}");
            let t = ddim.timesteps[i];
            let r = ddim
                .step(
                    &io[&format!("{key}.model_output")],
                    t,
                    &io[&format!("{key}.sample")],
                    pred,
                    Some(&io[&format!("{key}.noise")]),
                )
                .unwrap();
            let e1 = max_err(&r.prev_sample, &io[&format!("{key}.prev_sample")]);
            let e2 = max_err(
                &r.pred_original_sample,
                &io[&format!("{key}.pred_original_sample")],
            );
            assert!(
                e1 <= 1e-5 && e2 <= 1e-5,
                "config {k} step {i} (t {t}): {e1:e} {e2:e}"
            );
            worst = worst.max(e1).max(e2);
        }
    }
    println!("DDIM step outputs vs diffusers: max abs error {worst:.3e}");
}

#[test]
fn ddpm_add_noise_and_velocity_match_diffusers() {
    let io = io("schedulers");
    let eps_noise = DdpmNoise::new(BetaConfig::default(), Prediction::Epsilon).unwrap();
    let v_noise = DdpmNoise::new(BetaConfig::default(), Prediction::VPrediction).unwrap();
    let ac = Tensor::from_slice(eps_noise.alphas_cumprod());
    assert_eq!(max_err(&ac, &io["ddpm.alphas_cumprod"]), 0.0);
    let (x0, eps, t) = (&io["ddpm.x0"], &io["ddpm.eps"], &io["ddpm.t"]);
    let e1 = max_err(&eps_noise.add_noise(x0, eps, t), &io["ddpm.noisy"]);
    let e2 = max_err(&v_noise.target(x0, eps, t), &io["ddpm.velocity"]);
    assert_eq!(max_err(&eps_noise.target(x0, eps, t), eps), 0.0);
    println!("DDPM add_noise {e1:.3e}, velocity {e2:.3e}");
    assert!(e1 <= 1e-6 && e2 <= 1e-6);
    let ts = eps_noise.sample_timesteps(64, tch::Device::Cpu);
    assert!(ts.min().double_value(&[]) >= 0.0 && ts.max().double_value(&[]) <= 999.0);
    assert_eq!(max_err(&ts, &ts.round()), 0.0, "integer timesteps");

    // Zero terminal SNR (diffusers' rescale_betas_zero_snr), v-prediction: the schedule, the
    // noising (t = 999 is pure noise) and the v target (-x0 there).
    let zsnr = BetaConfig {
        rescale_betas_zero_snr: true,
        ..BetaConfig::default()
    };
    let z = DdpmNoise::new(zsnr, Prediction::VPrediction).unwrap();
    let ac = Tensor::from_slice(z.alphas_cumprod());
    let e0 = max_err(&ac, &io["ddpm_zsnr.alphas_cumprod"]);
    let e1 = max_err(&z.add_noise(x0, eps, t), &io["ddpm_zsnr.noisy"]);
    let e2 = max_err(&z.target(x0, eps, t), &io["ddpm_zsnr.velocity"]);
    println!("zero-SNR alphas_cumprod {e0:.3e}, add_noise {e1:.3e}, velocity {e2:.3e}");
    assert_eq!(z.alphas_cumprod()[999], 0.0);
    assert!(e0 <= 1e-7 && e1 <= 1e-6 && e2 <= 1e-6);
}

#[test]
fn ddim_sampler_runs_the_unet_with_tokens_and_zero_uncond() {
    use softalign_core::plugin::SamplerSpec;
    use softalign_core::sampler::{Guidance, SampleRequest};
    let io = io("inject_sdxl");
    let bb = load("sdxl");
    let adapters = vec![tokens_adapter(bb.as_ref(), &io, "inject_sdxl")];
    let spec: DdimSpec = serde_json::from_str(r#"{"steps": 3, "zero_uncond": true}"#).unwrap();
    let sampler = spec.build().unwrap();
    let run = |tokens: bool, scale: f64| {
        tch::manual_seed(5);
        let sel = tokens.then(TokenSelection::default);
        sampler
            .sample(SampleRequest {
                backbone: bb.as_ref(),
                adapters: &adapters,
                noise: io["sample"].shallow_clone(),
                cond: &cond(&io),
                uncond: None,
                guidance: Guidance {
                    scale,
                    cond_tokens: sel.clone(),
                    uncond_tokens: sel,
                },
                progress: false,
            })
            .unwrap()
    };
    let plain = run(false, 5.0);
    let with_tokens = run(true, 5.0);
    let no_cfg = run(true, 1.0);
    assert_eq!(plain.size(), io["sample"].size());
    assert!(plain.isfinite().all().int64_value(&[]) == 1);
    assert!(max_err(&plain, &with_tokens) > 1e-3, "tokens had no effect");
    assert!(
        max_err(&no_cfg, &with_tokens) > 1e-3,
        "guidance had no effect"
    );
}

/// The shipped UNet recipes pass `softalign recipe check` against a pipeline folder holding
/// the released configs (a check reads no weights).
#[test]
fn unet_recipes_pass_check() {
    use softalign_backbones::unet::UNetConfig;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for (recipe, cfg, sites) in [
        ("sd15-softrepa.toml", UNetConfig::sd15(), vec!["down"]),
        ("sd15-agsm.toml", UNetConfig::sd15(), vec!["down", "mid"]),
        ("sd15-dpo-softrepa.toml", UNetConfig::sd15(), vec!["down"]),
        (
            "sdxl-softrepa.toml",
            UNetConfig::sdxl(),
            vec!["down", "mid"],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("unet")).unwrap();
        std::fs::write(
            dir.path().join("unet/config.json"),
            cfg.to_json().to_string(),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_softalign"))
            .args(["recipe", "check"])
            .arg(root.join("recipes").join(recipe))
            .arg("--set")
            .arg(format!("backbone.path={}", dir.path().display()))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{recipe}: {stderr}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let got = &v["recipe"]["adapter"][0]["sites"];
        let want = serde_json::to_value(&sites).unwrap();
        assert_eq!(got, &want, "{recipe}: sites");
    }
}

/// Every variable of a loaded model, by name.
fn variables(vs: &tch::nn::VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().collect()
}

fn assert_bitwise_equal(kind: &str, a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{kind}: the two loads have other variables"
    );
    for (name, x) in a {
        assert!(
            x.equal(&b[name]),
            "{kind}: `{name}` differs between .bin and safetensors"
        );
    }
    println!("{kind}: {} tensors equal bit for bit", a.len());
}

#[test]
fn bin_model_folders_load_equal_to_their_safetensors_twins_and_code_is_refused() {
    use softalign_backbones::{clip::TextEncoder, sd3::Sd3Spec, t5::T5Encoder, vae::AutoencoderKl};
    let dir = common::python_fixture("bin_folders.py");
    let d = |kind: &str, form: &str| dir.path().join(kind).join(form);
    let dev = tch::Device::Cpu;
    let kind = Kind::Float;
    let load_backbone = |b: Box<dyn Backbone>| variables(b.var_store());
    // Each model kind's own loader, given the folder as a user would give it.
    type Loader<'a> = Box<dyn Fn(PathBuf) -> BTreeMap<String, Tensor> + 'a>;
    let loads: [(&str, Loader); 5] = [
        (
            "unet",
            Box::new(|p| load_backbone(build(UNetSpec::from_path(p)))),
        ),
        (
            "sd3 (sharded .bin)",
            Box::new(|p| {
                load_backbone(
                    Sd3Spec::from_path(p)
                        .build(&BuildContext::cpu("."))
                        .unwrap(),
                )
            }),
        ),
        (
            "vae",
            Box::new(|p| variables(AutoencoderKl::load(p, dev, kind).unwrap().vs())),
        ),
        (
            "clip",
            Box::new(|p| variables(TextEncoder::load(p, dev, kind).unwrap().vs())),
        ),
        (
            "t5",
            Box::new(|p| variables(T5Encoder::load(p, dev, kind).unwrap().vs())),
        ),
    ];
    for (name, load) in &loads {
        let folder = name.split(' ').next().unwrap();
        assert_bitwise_equal(name, &load(d(folder, "bin")), &load(d(folder, "safe")));
    }

    // A pickle that would run code is refused before anything is built from it, by name.
    let evil = dir.path().join("evil");
    let err = UNetSpec::from_path(&evil)
        .build(&BuildContext::cpu("."))
        .err()
        .expect("the evil pickle must be refused")
        .to_string();
    println!("evil pickle: {err}");
    assert!(
        err.contains("diffusion_pytorch_model.bin")
            && err.contains("system")
            && err.contains("refusing"),
        "{err}"
    );

    // As strict as safetensors: a missing and a stray tensor are named, with the file.
    let err = UNetSpec::from_path(dir.path().join("strict"))
        .build(&BuildContext::cpu("."))
        .err()
        .expect("a pickle missing a tensor must be refused")
        .to_string();
    println!("mismatched pickle: {err}");
    for needle in [
        "conv_out.bias",
        "stray.weight",
        "diffusion_pytorch_model.bin",
    ] {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
}

/// DiffusionDPO's train.py loss (tests/python/unet_fixtures.py `diffusion_dpo_reference`): soft
/// tokens on the SD1.5-like UNet as the policy, the same UNet with the adapters off as the
/// reference, two preference pairs sharing t and noise; the loss, the implicit accuracy, the
/// logged MSEs, the gradient reaching the tokens, and the --sft loss.
#[test]
fn diffusion_dpo_loss_matches_diffusion_dpo_train_py() {
    use softalign_core::objective::Objective;
    use softalign_core::plugin::ObjectiveSpec;
    use softalign_objectives::diffusion_dpo::DiffusionDpoSpec;
    use softalign_objectives::{evaluate, StepInputs, StepOptions};

    let want = &fixtures().manifest["dpo"];
    let io = io("dpo_loss");
    let bb = load("sd15");
    let adapters = vec![tokens_adapter(bb.as_ref(), &io, "inject_sd15")];
    let run = |sft: bool| {
        let spec = DiffusionDpoSpec {
            weight: 1.0,
            beta: want["beta"].as_f64().unwrap(),
            sft,
            tokens: None,
        };
        let objectives: Vec<Box<dyn Objective>> = vec![spec.build().unwrap()];
        for (_, t) in adapters[0].trainable() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let inputs = StepInputs {
            x0: io["x0"].shallow_clone(),
            cond: cond(&io),
            noise: io["noise"].shallow_clone(),
            timestep: io["timestep"].shallow_clone(),
            captions: None,
            preference_pairs: true,
        };
        let opts = StepOptions {
            pairs_per_forward: None,
            backward: Some(1.0),
        };
        evaluate(bb.as_ref(), Some(&adapters), &objectives, inputs, &opts).expect("dpo step")
    };
    let r = run(false);
    let term = |name: &str| r.terms.iter().find(|(n, _)| n == name).unwrap().1;
    let mut worst: f64 = 0.0;
    for (name, key) in [
        ("diffusion_dpo", "loss"),
        ("diffusion_dpo_implicit_acc", "implicit_acc"),
        ("diffusion_dpo_model_mse", "model_mse"),
        ("diffusion_dpo_ref_mse", "ref_mse"),
    ] {
        let err = (term(name) - want[key].as_f64().unwrap()).abs();
        println!(
            "diffusion_dpo `{name}`: {:.6} vs train.py {:.6} (abs error {err:.2e})",
            term(name),
            want[key]
        );
        worst = worst.max(err);
    }
    assert!(
        worst <= 1e-5,
        "diffusion_dpo differs from train.py by {worst:e}"
    );
    let (_, tokens) = &adapters[0].trainable()[0];
    let grad_err = max_err(&tokens.grad(), &io["tokens_grad"]);
    let grad_scale = io["tokens_grad"].abs().max().double_value(&[]);
    println!(
        "diffusion_dpo token gradient: max abs error {grad_err:.2e} (max |grad| {grad_scale:.3e})"
    );
    assert!(
        grad_err <= 1e-5 * grad_scale.max(1.0),
        "gradient error {grad_err:e}"
    );

    let sft = run(true);
    let err = (sft.total - want["sft"].as_f64().unwrap()).abs();
    println!("diffusion_dpo sft: abs error {err:.2e}");
    assert!(err <= 1e-5, "sft loss error {err:e}");
}

/// DDPO's per-step log-probability against ddpo-pytorch's `ddim_step_with_logprob` formula
/// (tests/python/unet_fixtures.py `ddpo_step_with_logprob`): per-sample timesteps including the
/// last step, eta 1 and 0.4, epsilon and v-prediction, clip_sample.
#[test]
fn ddim_log_prob_matches_ddpo_pytorch() {
    let io = io("ddim_log_prob");
    let mut worst: f64 = 0.0;
    let rel = |a: &Tensor, b: &Tensor| {
        let scale = b.abs().to_kind(Kind::Double).clamp_min(1.0);
        ((a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs() / scale)
            .max()
            .double_value(&[])
    };
    for (k, c) in fixtures().manifest["ddim_log_prob"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let mut spec = ddim_spec(&serde_json::json!({
            "spacing": "leading", "steps": c["steps"], "eta": c["eta"], "offset": c["offset"],
            "alpha_one": c["alpha_one"], "clip": c["clip"],
        }));
        spec.num_train_timesteps = 1000;
        let ddim = Ddim::new(&spec).unwrap();
        let pred = match c["pred"].as_str().unwrap() {
            "epsilon" => Prediction::Epsilon,
            _ => Prediction::VPrediction,
        };
        let t: Vec<i64> = c["t"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let get = |n: &str| io[&format!("{k}.{n}")].shallow_clone();
        let mo = get("model_output").set_requires_grad(true);
        for (prev, want) in [("given", "log_prob_given"), ("drawn", "log_prob_drawn")] {
            let r = ddim
                .step_with_log_prob(&mo, &t, &get("sample"), pred, Some(&get(prev)))
                .unwrap();
            let e = rel(&r.log_prob, &get(want)).max(max_err(&r.mean, &get("mean")));
            println!("ddim log-prob config {k} ({prev}): max relative error {e:.2e}");
            assert!(e <= 1e-5, "config {k} {prev}: {e:e}");
            assert!(
                r.log_prob.requires_grad(),
                "the log-prob must carry the model's graph"
            );
            worst = worst.max(e);
        }
        // Sampling then scoring the drawn sample gives the same density.
        let drawn = ddim
            .step_with_log_prob(&mo, &t, &get("sample"), pred, None)
            .unwrap();
        let rescored = ddim
            .step_with_log_prob(&mo, &t, &get("sample"), pred, Some(&drawn.prev_sample))
            .unwrap();
        assert!(max_err(&drawn.log_prob, &rescored.log_prob) <= 1e-6);
    }
    println!("DDIM log-prob vs ddpo-pytorch: max relative error {worst:.3e}");
    // t = 0 has no noise under ddpo's clamp, and eta 0 none at all: errors, not NaN.
    let mut spec = DdimSpec {
        steps: 20,
        eta: 1.0,
        steps_offset: 0,
        ..DdimSpec::default()
    };
    let x = Tensor::zeros([1, 4, 2, 2], (Kind::Float, tch::Device::Cpu));
    let ddim = Ddim::new(&spec).unwrap();
    let e = ddim
        .step_with_log_prob(&x, &[0], &x, Prediction::Epsilon, Some(&x))
        .err()
        .unwrap();
    assert!(e.to_string().contains("adds no noise"), "{e}");
    spec.eta = 0.0;
    let e = Ddim::new(&spec)
        .unwrap()
        .step_with_log_prob(&x, &[500], &x, Prediction::Epsilon, Some(&x))
        .err()
        .unwrap();
    assert!(e.to_string().contains("deterministic"), "{e}");
}
