//! SD3 backbone behaviour that needs no Python: gradients reach only the adapter, strict
//! loading errors, save/reload, config checking, flow-matching noise and the sampler.
use std::collections::BTreeMap;
use std::path::Path;

use softalign_backbones::schedulers::flow_match_euler::FlowMatchEulerSpec;
use softalign_backbones::sd3::{FlowMatch, Sd3Backbone, Sd3Config, Sd3Spec, TimestepSampling};
use softalign_core::adapter::soft_tokens::SoftTokensSpec;
use softalign_core::adapter::{Adapter, Injection, TokenSelection};
use softalign_core::backbone::{Backbone, Conditioning, NoiseProcess};
use softalign_core::dtype::DType;
use softalign_core::plugin::{AdapterSpec, BackboneSpec, BuildContext, SamplerSpec};
use softalign_core::sampler::{Guidance, SampleRequest};
use softalign_core::site::{SiteSelector, TokenSpace};
use softalign_core::tensors::{save_safetensors, MappedSafetensors};
use tch::{Device, Kind, Tensor};
/// Tests here seed and draw from torch's one global generator; they take turns so that a
/// parallel test cannot draw between another's seed and its draws.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tiny() -> Sd3Config {
    Sd3Config {
        sample_size: 8,
        patch_size: 2,
        in_channels: 4,
        out_channels: Some(4),
        num_layers: 3,
        attention_head_dim: 8,
        num_attention_heads: 2,
        joint_attention_dim: 12,
        caption_projection_dim: 16,
        pooled_projection_dim: 10,
        pos_embed_max_size: Some(8),
        dual_attention_layers: vec![1],
        qk_norm: Some("rms_norm".into()),
    }
}

fn noise() -> FlowMatch {
    FlowMatch::new(TimestepSampling::UniformInt, 1.0).unwrap()
}

fn random() -> Sd3Backbone {
    tch::manual_seed(7);
    Sd3Backbone::random(&tiny(), Device::Cpu, DType::F32, noise()).unwrap()
}

fn inputs(b: i64) -> (Tensor, Tensor, Conditioning) {
    let x = Tensor::randn([b, 4, 8, 8], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[120.0f32, 640.0, 999.0, 3.0][..b as usize]);
    let c = Conditioning::new()
        .with(
            "encoder_hidden_states",
            Tensor::randn([b, 5, 12], (Kind::Float, Device::Cpu)),
        )
        .with(
            "pooled_projections",
            Tensor::randn([b, 10], (Kind::Float, Device::Cpu)),
        );
    (x, t, c)
}

fn tokens(bb: &dyn Backbone, space: TokenSpace) -> Box<dyn Adapter> {
    SoftTokensSpec {
        tokens: 2,
        sites: SiteSelector::One("joint_blocks[0..2]".into()),
        time_buckets: 100,
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
    .build(bb.info(), &BuildContext::cpu("."))
    .unwrap()
}

#[test]
fn describe_reports_sites_and_conditioning_from_config_only() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cfg = serde_json::to_string(&tiny().to_json()).unwrap();
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let info = Sd3Spec::from_path(dir.path())
        .describe(&BuildContext::cpu("."))
        .unwrap();
    assert_eq!(info.kind, "sd3");
    assert_eq!(info.sites.len(), 3);
    assert_eq!(info.sites[2].name, "joint_blocks.2");
    assert_eq!(
        info.sites[0].token_dim(TokenSpace::Context).unwrap(),
        12,
        "context space = joint_attention_dim"
    );
    assert_eq!(info.sites[0].token_dim(TokenSpace::Joint).unwrap(), 16);
    assert_eq!(
        info.conditioning,
        ["encoder_hidden_states", "pooled_projections"]
    );
    let preset: Box<dyn BackboneSpec> =
        toml::from_str("type = \"sd3\"\npreset = \"sd3.5-medium\"").unwrap();
    let info = preset.describe(&BuildContext::cpu(".")).unwrap();
    assert_eq!(info.sites.len(), 24);
    assert_eq!(info.sites[0].token_dim(TokenSpace::Joint).unwrap(), 1536);
}

#[test]
fn config_rejects_unknown_keys_and_impossible_values() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    let mut v = tiny().to_json();
    v["num_layerz"] = 3.into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = Sd3Config::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("num_layerz") && e.contains("config.json"), "{e}");

    let mut v = tiny().to_json();
    v["caption_projection_dim"] = 20.into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = Sd3Config::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("caption_projection_dim"), "{e}");

    let mut v = tiny().to_json();
    v["_class_name"] = "UNet2DConditionModel".into();
    std::fs::write(&p, v.to_string()).unwrap();
    assert!(Sd3Config::from_file(&p).is_err());

    let spec: Result<Box<dyn BackboneSpec>, _> =
        toml::from_str("type = \"sd3\"\npreset = \"sd3-medium\"\npaht = \"x\"");
    assert!(spec.unwrap_err().to_string().contains("paht"));
}

#[test]
fn only_adapter_tensors_receive_gradients() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let bb = random();
    let frozen: Vec<(String, Tensor)> = bb
        .var_store()
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect();
    for (n, t) in bb.var_store().variables() {
        assert!(!t.requires_grad(), "{n} should be frozen");
    }
    for space in [TokenSpace::Joint, TokenSpace::Context] {
        let adapters = vec![tokens(&bb, space)];
        let params: Vec<Tensor> = adapters[0].trainable().into_iter().map(|p| p.1).collect();
        let start: Vec<Tensor> = params.iter().map(|p| p.detach().copy()).collect();
        let inj = Injection {
            adapters: &adapters,
            selection: TokenSelection::default(),
        };
        let (x, t, c) = inputs(2);
        for _ in 0..3 {
            let out = bb.forward(&x, &t, &c, Some(&inj)).unwrap();
            let loss = out.square().mean(Kind::Float);
            loss.backward();
            let _guard = tch::no_grad_guard();
            for p in &params {
                let g = p.grad();
                assert!(g.defined(), "adapter parameter without gradient");
                assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
                let mut p = p.shallow_clone();
                let _ = p.g_sub_(&(&g * 0.1));
                let _ = p.grad().zero_();
            }
        }
        for (p, s) in params.iter().zip(&start) {
            assert!(!p.detach().equal(s), "adapter parameter did not move");
        }
        for (n, t) in bb.var_store().variables() {
            assert!(!t.grad().defined(), "{n} received a gradient");
        }
    }
    for (n, before) in &frozen {
        let now = &bb.var_store().variables()[n];
        assert!(now.equal(before), "frozen weight {n} changed");
    }
}

#[test]
fn tokens_only_touch_blocks_they_are_given_and_are_dropped_after() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let bb = random();
    let (x, t, c) = inputs(2);
    let _guard = tch::no_grad_guard();
    let plain = bb.forward(&x, &t, &c, None).unwrap();
    let a = tokens(&bb, TokenSpace::Joint);
    let adapters = vec![a];
    let inj = Injection {
        adapters: &adapters,
        selection: TokenSelection::default(),
    };
    let with = bb.forward(&x, &t, &c, Some(&inj)).unwrap();
    assert_eq!(with.size(), plain.size());
    assert!(!with.allclose(&plain, 1e-6, 1e-6, false));
}

fn saved_model(dir: &Path) -> Sd3Backbone {
    let bb = random();
    bb.save_pretrained(dir).unwrap();
    bb
}

fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let f = dir.join("diffusion_pytorch_model.safetensors");
    let all = MappedSafetensors::open(&f).unwrap().all().unwrap();
    let mut v: Vec<(String, Tensor)> = all.into_iter().collect();
    edit(&mut v);
    save_safetensors(&f, &v, &BTreeMap::new()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Sd3Spec::from_path(dir).build(&BuildContext::cpu(".")) {
        Ok(_) => panic!("loading should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn save_pretrained_round_trips_in_each_dtype() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let bb = saved_model(dir.path());
    let (x, t, c) = inputs(2);
    let _guard = tch::no_grad_guard();
    let want = bb.forward(&x, &t, &c, None).unwrap();
    let again = Sd3Spec::from_path(dir.path())
        .build(&BuildContext::cpu("."))
        .unwrap();
    assert!(again.forward(&x, &t, &c, None).unwrap().equal(&want));
    for (dtype, tol) in [(DType::Bf16, 0.25), (DType::F16, 0.05)] {
        let ctx = BuildContext {
            dtype_override: Some(dtype),
            ..BuildContext::cpu(".")
        };
        let half = Sd3Spec::from_path(dir.path()).build(&ctx).unwrap();
        for (n, v) in half.var_store().variables() {
            assert_eq!(v.kind(), dtype.kind(), "{n}");
        }
        let out = half.forward(&x, &t, &c, None).unwrap();
        assert_eq!(out.kind(), dtype.kind());
        let err = (out.to_kind(Kind::Float) - &want)
            .abs()
            .max()
            .double_value(&[]);
        println!("{dtype:?} vs f32: max abs difference {err:.3e}");
        assert!(err < tol, "{dtype:?}: {err}");
    }
}

#[test]
fn missing_tensor_is_named() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    saved_model(dir.path());
    rewrite(dir.path(), |v| {
        v.retain(|(n, _)| n != "transformer_blocks.1.attn2.to_q.weight")
    });
    let e = load_err(dir.path());
    assert!(
        e.contains("missing") && e.contains("transformer_blocks.1.attn2.to_q.weight"),
        "{e}"
    );
    // A deliberate partial load may leave it out.
    let spec = Sd3Spec {
        allow_missing: vec!["transformer_blocks.1.attn2.*".into()],
        ..Sd3Spec::from_path(dir.path())
    };
    assert!(spec.build(&BuildContext::cpu(".")).is_ok());
}

#[test]
fn extra_tensor_is_named() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    saved_model(dir.path());
    rewrite(dir.path(), |v| {
        v.push((
            "transformer_blocks.9.attn.to_q.weight".into(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        ))
    });
    let e = load_err(dir.path());
    assert!(
        e.contains("does not use") && e.contains("transformer_blocks.9.attn.to_q.weight"),
        "{e}"
    );
    let spec = Sd3Spec {
        allow_unused: vec!["transformer_blocks.9.attn.to_q.weight".into()],
        ..Sd3Spec::from_path(dir.path())
    };
    assert!(spec.build(&BuildContext::cpu(".")).is_ok());
}

#[test]
fn wrong_shape_is_named() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    saved_model(dir.path());
    rewrite(dir.path(), |v| {
        for (n, t) in v.iter_mut() {
            if n == "context_embedder.weight" {
                *t = Tensor::zeros([16, 13], (Kind::Float, Device::Cpu));
            }
        }
    });
    let e = load_err(dir.path());
    assert!(
        e.contains("context_embedder.weight") && e.contains("[16, 13]") && e.contains("[16, 12]"),
        "{e}"
    );
}

#[test]
fn corrupt_header_names_the_file() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    saved_model(dir.path());
    let f = dir.path().join("diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[8..24].copy_from_slice(b"{not json at all");
    std::fs::write(&f, bytes).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
}

#[test]
fn input_shape_errors_name_the_tensor() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let bb = random();
    let (x, t, _) = inputs(2);
    let c = Conditioning::new()
        .with(
            "encoder_hidden_states",
            Tensor::zeros([2, 5, 11], (Kind::Float, Device::Cpu)),
        )
        .with(
            "pooled_projections",
            Tensor::zeros([2, 10], (Kind::Float, Device::Cpu)),
        );
    let e = bb.forward(&x, &t, &c, None).unwrap_err().to_string();
    assert!(e.contains("encoder_hidden_states"), "{e}");
    let big = Tensor::zeros([2, 4, 18, 18], (Kind::Float, Device::Cpu));
    let (_, _, c) = inputs(2);
    let e = bb.forward(&big, &t, &c, None).unwrap_err().to_string();
    assert!(e.contains("pos_embed_max_size"), "{e}");
}

#[test]
fn flow_matching_noise_and_timesteps() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let fm = noise();
    let x0 = Tensor::ones([2, 1, 2, 2], (Kind::Float, Device::Cpu));
    let eps = Tensor::zeros([2, 1, 2, 2], (Kind::Float, Device::Cpu)) - 1.0;
    let t = Tensor::from_slice(&[250.0f32, 1000.0]);
    let xt = fm.add_noise(&x0, &eps, &t);
    assert!((xt.get(0).mean(Kind::Float).double_value(&[]) - 0.5).abs() < 1e-6);
    assert!((xt.get(1).mean(Kind::Float).double_value(&[]) + 1.0).abs() < 1e-6);
    assert!(fm.target(&x0, &eps, &t).equal(&(eps - &x0)));
    tch::manual_seed(3);
    let ts = fm.sample_timesteps(4096, Device::Cpu);
    let (lo, hi) = (ts.min().double_value(&[]), ts.max().double_value(&[]));
    assert!(lo >= 0.0 && hi <= 999.0 && hi > 990.0);
    assert!(ts.equal(&ts.round()), "uniform_int draws integers");
    tch::manual_seed(3);
    assert!(
        fm.sample_timesteps(4096, Device::Cpu).equal(&ts),
        "seeded by torch's generator"
    );
    let shifted = FlowMatch::new(TimestepSampling::Uniform, 3.0).unwrap();
    let m = shifted
        .sample_timesteps(8192, Device::Cpu)
        .mean(Kind::Float)
        .double_value(&[]);
    assert!(m > 600.0, "shift 3 pushes sigma up (mean t {m})");
    let ln = FlowMatch::new(
        TimestepSampling::LogitNormal {
            mean: 0.0,
            std: 1.0,
        },
        1.0,
    )
    .unwrap();
    let m = ln
        .sample_timesteps(8192, Device::Cpu)
        .mean(Kind::Float)
        .double_value(&[]);
    assert!(
        (m - 500.0).abs() < 20.0,
        "logit-normal(0, 1) is centred (mean t {m})"
    );
    assert!(FlowMatch::new(TimestepSampling::Uniform, 0.0).is_err());
}

#[test]
fn sampler_runs_cfg_with_per_branch_tokens() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let bb = random();
    let adapters = vec![tokens(&bb, TokenSpace::Joint)];
    let sampler = FlowMatchEulerSpec {
        steps: 3,
        shift: 3.0,
        guidance: None,
    }
    .build()
    .unwrap();
    let (x, _, c) = inputs(2);
    let (_, _, u) = inputs(2);
    let run = |cond_tokens, uncond_tokens, scale| {
        sampler
            .sample(SampleRequest {
                backbone: &bb,
                adapters: &adapters,
                noise: x.shallow_clone(),
                cond: &c,
                uncond: Some(&u),
                guidance: Guidance {
                    scale,
                    cond_tokens,
                    uncond_tokens,
                },
                progress: false,
            })
            .unwrap()
    };
    let sel = Some(TokenSelection::default());
    let both = run(sel.clone(), sel.clone(), 4.0);
    let cond_only = run(sel.clone(), None, 4.0);
    let none = run(None, None, 4.0);
    assert_eq!(both.size(), x.size());
    assert!(!both.allclose(&none, 1e-5, 1e-5, false));
    assert!(!both.allclose(&cond_only, 1e-5, 1e-5, false));
    // Scale 1 disables guidance: only the conditional branch runs.
    let s1 = run(None, None, 1.0);
    let manual = {
        let _guard = tch::no_grad_guard();
        let sched = softalign_backbones::schedulers::flow_match_euler::schedule(3, 3.0).unwrap();
        let mut z = x.shallow_clone();
        for i in 0..3 {
            let t = Tensor::full([2], sched.timesteps[i] as f64, (Kind::Float, Device::Cpu));
            let v = bb.forward(&z, &t, &c, None).unwrap();
            z = &z + v * (sched.sigmas[i + 1] - sched.sigmas[i]) as f64;
        }
        z
    };
    assert!(s1.allclose(&manual, 1e-6, 1e-6, false));
}

#[test]
fn catalogue_entries_exist_and_their_examples_parse() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    use softalign_core::catalogue::{find, PluginKind};
    let sd3 = find(PluginKind::Backbone, "sd3").expect("sd3 registered");
    let t: toml::Table = toml::from_str(sd3.example).unwrap();
    let spec: Box<dyn BackboneSpec> = t["backbone"].clone().try_into().unwrap();
    assert!(format!("{spec:?}").contains("Sd3Spec"));
    let fm = find(PluginKind::Sampler, "flow_match_euler").expect("sampler registered");
    let t: toml::Table = toml::from_str(fm.example).unwrap();
    let spec: Box<dyn SamplerSpec> = t["sampler"].clone().try_into().unwrap();
    spec.validate().unwrap();
}

#[test]
fn bench_runs_every_case() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    use softalign_backbones::sd3::bench::{run, BenchConfig};
    let cfg = BenchConfig {
        model: tiny(),
        batch: 1,
        resolution: 64,
        text_len: 5,
        iters: 1,
        warmup: 0,
        token_blocks: 2,
        ..BenchConfig::small_cpu()
    };
    let rows = run(&cfg, |_| {}).unwrap();
    // none, soft tokens, LoRA unmerged, LoRA merged; each as a sampling and a training step.
    assert_eq!(rows.len(), 8, "{rows:?}");
    assert_eq!(
        rows.iter().filter(|r| r.case.contains("LoRA")).count(),
        4,
        "{rows:?}"
    );
    assert!(rows
        .iter()
        .all(|r| r.ms_per_step > 0.0 && r.pairs_per_s > 0.0));
    let too_many = BenchConfig {
        token_blocks: 9,
        ..cfg
    };
    assert!(run(&too_many, |_| {}).is_err());
}

#[test]
fn compact_context_gives_the_same_output_with_either_token_space() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let bb = random();
    tch::manual_seed(11);
    let (x, t, c) = inputs(3);
    let compact = bb
        .compact_conditioning(Conditioning(
            c.0.iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone()))
                .collect(),
        ))
        .unwrap();
    assert!(compact.0.contains_key("context_embeds"));
    assert!(!compact.0.contains_key("encoder_hidden_states"));
    assert_eq!(compact.get("context_embeds").unwrap().size(), [3, 5, 16]);
    let _guard = tch::no_grad_guard();
    let plain = bb.forward(&x, &t, &c, None).unwrap();
    let got = bb.forward(&x, &t, &compact, None).unwrap();
    assert!(
        (&plain - &got).abs().max().double_value(&[]) <= 1e-5,
        "no tokens"
    );
    for space in [TokenSpace::Joint, TokenSpace::Context] {
        let adapters = vec![tokens(&bb, space)];
        let inj = Injection {
            adapters: &adapters,
            selection: TokenSelection::default(),
        };
        let a = bb.forward(&x, &t, &c, Some(&inj)).unwrap();
        let b = bb.forward(&x, &t, &compact, Some(&inj)).unwrap();
        let err = (&a - &b).abs().max().double_value(&[]);
        assert!(err <= 1e-5, "{space:?}: {err}");
        assert!(
            (&a - &plain).abs().max().double_value(&[]) > 1e-3,
            "{space:?}: tokens had no effect"
        );
    }
    // The compact form is tied to this transformer's context_embedder.
    let fp = bb.compact_fingerprint().unwrap();
    assert!(fp["context_embedder_sha256"].as_str().unwrap().len() == 64);
}
