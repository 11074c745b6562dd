//! The shapes world's model: pipeline folder round trip, forward, soft tokens at its sites,
//! its tokenizer against every caption and prompt of the world, and the dataset's determinism.
use softalign_backbones::sd3::{FlowMatch, TimestepSampling};
use softalign_backbones::shapes::world::{eval_prompts, train_split};
use softalign_backbones::shapes::{world_tokenizer, ShapesBackbone, ShapesConfig, ShapesDataSpec};
use softalign_core::adapter::soft_tokens::SoftTokensSpec;
use softalign_core::adapter::{Adapter, Injection, TokenSelection};
use softalign_core::backbone::Backbone;
use softalign_core::dtype::DType;
use softalign_core::plugin::{AdapterSpec, BuildContext, DatasetSpec};
use softalign_core::site::{SiteSelector, TokenSpace};
use tch::{Device, Kind, Tensor};

/// Tests seed and draw from torch's one global generator: they take turns, so that the
/// determinism test sees only its own draws.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_turn() -> std::sync::MutexGuard<'static, ()> {
    TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn noise() -> FlowMatch {
    FlowMatch::new(TimestepSampling::UniformInt, 1.0).unwrap()
}

/// The tiny preset with every weight perturbed: DiT's zero init would make the output 0
/// whatever the input, which no test could tell apart.
fn random() -> ShapesBackbone {
    tch::manual_seed(7);
    let cfg = ShapesConfig::tiny().unwrap();
    let bb = ShapesBackbone::random(&cfg, Device::Cpu, DType::F32, noise()).unwrap();
    let _guard = tch::no_grad_guard();
    for (_, mut t) in bb.var_store().variables() {
        let r = t.randn_like() * 0.05;
        let _ = t.g_add_(&r);
    }
    bb
}

fn prompts(n: usize) -> Vec<String> {
    [
        "a photo of a red circle",
        "two blue squares",
        "",
        "a green triangle above a yellow diamond",
    ]
    .iter()
    .cycle()
    .take(n)
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn preset_fits_together_and_describes_itself() {
    let _rng = rng_turn();
    let cfg = ShapesConfig::tiny().unwrap();
    let bb = ShapesBackbone::random(&cfg, Device::Cpu, DType::F32, noise()).unwrap();
    assert_eq!(bb.sample_shape(), Some([3, 32, 32]));
    assert_eq!(bb.info().kind, "shapes");
    assert_eq!(bb.info().conditioning, ["input_ids"]);
    let names: Vec<&str> = bb.info().sites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "joint_blocks.0",
            "joint_blocks.1",
            "joint_blocks.2",
            "joint_blocks.3"
        ]
    );
    let vars = bb.var_store().variables();
    assert!(vars
        .keys()
        .all(|k| k.starts_with("text_encoder.") || k.starts_with("transformer.")));
    assert!(vars.contains_key("text_encoder.text_projection.weight"));
    assert!(vars.contains_key("text_encoder.text_model.embeddings.token_embedding.weight"));
    assert!(vars.contains_key("transformer.proj_out.weight"));
    // DiT init: the first prediction is exactly zero.
    let c = bb.encode_prompts(&prompts(2)).unwrap();
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let out = bb
        .forward(&x, &Tensor::from_slice(&[10.0f32, 900.0]), &c, None)
        .unwrap();
    assert_eq!(out.abs().max().double_value(&[]), 0.0);
}

#[test]
fn forward_encode_and_decode_have_the_right_shapes() {
    let _rng = rng_turn();
    let bb = random();
    let c = bb.encode_prompts(&prompts(3)).unwrap();
    let ids = c.get("input_ids").unwrap();
    assert_eq!(ids.size(), [3, 24]);
    assert_eq!(ids.kind(), Kind::Int64);
    let x = Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[0.0f32, 500.0, 999.0]);
    let out = bb.forward(&x, &t, &c, None).unwrap();
    assert_eq!(out.size(), [3, 3, 32, 32]);
    assert!(out.isfinite().all().int64_value(&[]) == 1);
    // The caption matters.
    let c2 = bb
        .encode_prompts(&vec!["three purple squares".to_string(); 3])
        .unwrap();
    let out2 = bb.forward(&x, &t, &c2, None).unwrap();
    assert!(!out.allclose(&out2, 1e-5, 1e-5, false));
    let img = bb.decode(&(x.shallow_clone() * 3.0)).unwrap();
    assert_eq!(img.size(), [3, 3, 32, 32]);
    assert!(img.abs().max().double_value(&[]) <= 1.0);
    assert!(bb
        .decode(&Tensor::zeros([1, 4, 8, 8], (Kind::Float, Device::Cpu)))
        .is_err());
    let bad = softalign_core::backbone::Conditioning::new()
        .with("input_ids", Tensor::from_slice(&[900i64]).view([1, 1]));
    assert!(bb
        .forward(&x.narrow(0, 0, 1), &t.narrow(0, 0, 1), &bad, None)
        .is_err());
}

#[test]
fn save_pretrained_then_load_is_bit_exact() {
    let _rng = rng_turn();
    let bb = random();
    let dir = tempfile::tempdir().unwrap();
    bb.save_pretrained(dir.path()).unwrap();
    for f in [
        "model_index.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    let back = ShapesBackbone::load(dir.path(), Device::Cpu, DType::F32, noise()).unwrap();
    let (a, b) = (bb.var_store().variables(), back.var_store().variables());
    assert_eq!(a.len(), b.len());
    for (n, t) in &a {
        assert!(t.equal(&b[n]), "{n} differs after the round trip");
    }
    let c = bb.encode_prompts(&prompts(2)).unwrap();
    assert!(c.get("input_ids").unwrap().equal(
        back.encode_prompts(&prompts(2))
            .unwrap()
            .get("input_ids")
            .unwrap()
    ));
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[100.0f32, 700.0]);
    let _guard = tch::no_grad_guard();
    assert!(bb
        .forward(&x, &t, &c, None)
        .unwrap()
        .equal(&back.forward(&x, &t, &c, None).unwrap()));
    // A tensor too many or too few is refused, naming it.
    let f = dir
        .path()
        .join("transformer/diffusion_pytorch_model.safetensors");
    let mut all: Vec<(String, Tensor)> = softalign_core::tensors::MappedSafetensors::open(&f)
        .unwrap()
        .all()
        .unwrap()
        .into_iter()
        .collect();
    all.push((
        "extra.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    softalign_core::tensors::save_safetensors(&f, &all, &Default::default()).unwrap();
    let err = ShapesBackbone::load(dir.path(), Device::Cpu, DType::F32, noise()).unwrap_err();
    assert!(err.to_string().contains("extra.weight"), "{err}");
}

fn tokens(bb: &dyn Backbone) -> Box<dyn Adapter> {
    SoftTokensSpec {
        tokens: 4,
        sites: SiteSelector::One("joint_blocks[0..2]".into()),
        time_buckets: 10,
        shared_time_row: false,
        shared_tokens: false,
        token_space: TokenSpace::Joint,
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
fn soft_tokens_change_the_output_and_only_they_get_gradients() {
    let _rng = rng_turn();
    let bb = random();
    let adapters = vec![tokens(&bb)];
    let inj = Injection {
        adapters: &adapters,
        selection: TokenSelection::default(),
    };
    let c = bb.encode_prompts(&prompts(2)).unwrap();
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[300.0f32, 600.0]);
    let plain = bb.forward(&x, &t, &c, None).unwrap();
    let with = bb.forward(&x, &t, &c, Some(&inj)).unwrap();
    assert_eq!(with.size(), plain.size());
    assert!(!with.allclose(&plain, 1e-6, 1e-6, false));
    with.square().mean(Kind::Float).backward();
    for (n, p) in adapters[0].trainable() {
        let g = p.grad();
        assert!(
            g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{n} got no gradient"
        );
    }
    for (n, v) in bb.var_store().variables() {
        assert!(
            !v.requires_grad() && !v.grad().defined(),
            "{n} is not frozen"
        );
    }
}

#[test]
fn every_caption_and_prompt_fits_the_text_positions() {
    let _rng = rng_turn();
    let tok = world_tokenizer(24).unwrap();
    let unk = i64::from(tok.token_to_id("<|unk|>").unwrap());
    let mut texts: Vec<String> = eval_prompts(0).into_iter().map(|p| p.prompt).collect();
    for ex in train_split(3000, 0) {
        texts.extend(ex.captions);
    }
    let mut longest = 0;
    for t in &texts {
        let ids = tok.encode_ids(t).unwrap();
        assert!(
            !ids.contains(&unk),
            "{t:?} has a word outside the vocabulary"
        );
        let eos = ids.iter().position(|&i| i == 1).expect("EOS kept");
        assert_eq!(eos, t.split_whitespace().count() + 1, "{t:?}");
        longest = longest.max(eos + 1);
    }
    assert!((10..=24).contains(&longest), "longest prompt {longest} ids");
}

#[test]
fn the_dataset_is_deterministic_per_torch_seed() {
    let _rng = rng_turn();
    let spec: ShapesDataSpec = toml::from_str("n = 12\nseed = 3\ncaption_dropout = 0.3\n").unwrap();
    let data = spec.build(&BuildContext::cpu(".")).unwrap();
    assert_eq!(data.len(), 12);
    let idx = [0usize, 5, 11, 5, 2, 7, 9, 1];
    let draw = |seed: i64| {
        tch::manual_seed(seed);
        data.batch(&idx, Device::Cpu).unwrap()
    };
    let (a, b, c) = (draw(1), draw(1), draw(2));
    assert_eq!(a.x0.size(), [8, 3, 32, 32]);
    assert!(a.x0.min().double_value(&[]) >= -1.0 && a.x0.max().double_value(&[]) <= 1.0);
    assert!(a.x0.equal(&c.x0), "images do not depend on the torch seed");
    let ids = |b: &softalign_core::dataset::Batch| b.cond.get("input_ids").unwrap().shallow_clone();
    assert_eq!(ids(&a).size(), [8, 24]);
    assert!(ids(&a).equal(&ids(&b)));
    assert!(
        !ids(&a).equal(&ids(&c)),
        "captions should follow the torch seed"
    );
    // Over many draws an image shows several captions, and the empty prompt (BOS, EOS, pad).
    let mut seen = std::collections::BTreeSet::new();
    let mut empty = 0;
    for s in 0..40 {
        tch::manual_seed(100 + s);
        let r = data.batch(&[4], Device::Cpu).unwrap();
        let v: Vec<i64> = ids(&r).view([-1]).try_into().unwrap();
        if v[1] == 1 {
            empty += 1;
        }
        seen.insert(v);
    }
    assert!(seen.len() >= 3, "{} distinct captions", seen.len());
    assert!(
        (3..=25).contains(&empty),
        "{empty} of 40 dropped at p = 0.3"
    );
    assert!(data.batch(&[12], Device::Cpu).is_err());
}

/// The UNet base's preset: SD1.5's block groups as sites, DDPM epsilon, a pipeline folder with
/// `unet/` and a DDIM scheduler config that loads back bit for bit, tokens at `down` that move
/// the output and alone get gradients.
#[test]
fn the_unet_preset_round_trips_and_takes_tokens_at_its_groups() {
    let _rng = rng_turn();
    use softalign_core::backbone::Prediction;
    tch::manual_seed(3);
    let cfg = ShapesConfig::unet().unwrap();
    let bb = ShapesBackbone::random(&cfg, Device::Cpu, DType::F32, noise()).unwrap();
    assert_eq!(bb.info().prediction, Prediction::Epsilon);
    let names: Vec<&str> = bb.info().sites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["down", "mid", "up"]);
    assert!(bb.transformer().is_none() && bb.unet().is_some());
    // DDPM noising: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, the target is eps.
    let x0 = Tensor::ones([1, 3, 32, 32], (Kind::Float, Device::Cpu));
    let eps = Tensor::zeros_like(&x0);
    let t = Tensor::from_slice(&[999.0f32]);
    let xt = bb.noise().add_noise(&x0, &eps, &t);
    // Stable Diffusion's scaled-linear betas: linspace(sqrt(0.00085), sqrt(0.012))^2.
    let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
    let abar_999: f64 = (0..1000)
        .map(|i| 1.0 - (a + (b - a) * i as f64 / 999.0).powi(2))
        .product();
    assert!((xt.mean(Kind::Float).double_value(&[]) - abar_999.sqrt()).abs() < 1e-4);
    assert!(bb.noise().target(&x0, &eps, &t).equal(&eps));

    let dir = tempfile::tempdir().unwrap();
    bb.save_pretrained(dir.path()).unwrap();
    for f in [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    assert!(!dir.path().join("transformer").exists());
    let sched: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(sched["_class_name"], "DDIMScheduler");
    assert_eq!(sched["beta_schedule"], "scaled_linear");
    assert_eq!(sched["clip_sample_range"], 2.0);
    // The pixel codec: the white canvas (1) is the UNet's 0, and back.
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("model_index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(index["softalign_pixel_shift"], 1.0);
    let white = Tensor::ones([1, 3, 32, 32], (Kind::Float, Device::Cpu));
    let z = bb.encode_images(&white).unwrap();
    assert_eq!(z.abs().max().double_value(&[]), 0.0);
    assert!(bb.decode(&z).unwrap().equal(&white));
    let back = ShapesBackbone::load(dir.path(), Device::Cpu, DType::F32, noise()).unwrap();
    let (a, b) = (bb.var_store().variables(), back.var_store().variables());
    assert_eq!(a.len(), b.len());
    for (n, t) in &a {
        assert!(t.equal(&b[n]), "{n} differs after the round trip");
    }

    let spec: SoftTokensSpec =
        serde_json::from_value(serde_json::json!({ "tokens": 4, "sites": ["down"] })).unwrap();
    let adapters = vec![spec.build(bb.info(), &BuildContext::cpu(".")).unwrap()];
    let inj = Injection {
        adapters: &adapters,
        selection: TokenSelection::default(),
    };
    let c = bb.encode_prompts(&prompts(2)).unwrap();
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[300.0f32, 600.0]);
    let plain = back.forward(&x, &t, &c, None).unwrap();
    assert!(plain.equal(&bb.forward(&x, &t, &c, None).unwrap()));
    let with = bb.forward(&x, &t, &c, Some(&inj)).unwrap();
    assert_eq!(with.size(), [2, 3, 32, 32]);
    assert!(!with.allclose(&plain, 1e-6, 1e-6, false));
    with.square().mean(Kind::Float).backward();
    for (n, p) in adapters[0].trainable() {
        assert!(p.grad().defined(), "{n} got no gradient");
    }
    assert!(bb
        .var_store()
        .variables()
        .values()
        .all(|v| !v.grad().defined()));

    // One denoiser per folder.
    std::fs::create_dir_all(dir.path().join("transformer")).unwrap();
    std::fs::write(dir.path().join("transformer/config.json"), "{}").unwrap();
    let err = ShapesBackbone::load(dir.path(), Device::Cpu, DType::F32, noise()).unwrap_err();
    assert!(
        err.to_string().contains("both transformer/ and unet/"),
        "{err}"
    );
}

#[test]
fn flow_matching_settings_are_refused_for_the_unet() {
    let _rng = rng_turn();
    let spec: Box<dyn softalign_core::plugin::BackboneSpec> = serde_json::from_value(
        serde_json::json!({ "type": "shapes", "preset": "unet", "timesteps": { "kind": "logit_normal" } }),
    )
    .unwrap();
    let err = spec.describe(&BuildContext::cpu(".")).unwrap_err();
    assert!(err.to_string().contains("DDPM UNet"), "{err}");
    let ok: Box<dyn softalign_core::plugin::BackboneSpec> =
        serde_json::from_value(serde_json::json!({ "type": "shapes", "preset": "mmdit" })).unwrap();
    let info = ok.describe(&BuildContext::cpu(".")).unwrap();
    assert_eq!(info.sites.len(), 4);
}
