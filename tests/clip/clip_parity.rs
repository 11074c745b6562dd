//! CLIP text encoder parity against transformers 5.23.0: tiny random CLIPTextModel /
//! CLIPTextModelWithProjection folders written by `tests/python/clip_fixtures.py` (run once per
//! test binary), plus loading, saving and config behaviour.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use softalign_backbones::clip::{ClipTextConfig, TextEncoder, TextEncoderOutput};
use softalign_core::tensors::{save_safetensors, MappedSafetensors};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

use crate::common::Fixtures;

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| Fixtures::new("clip_fixtures.py"))
}

fn io(case: &str) -> BTreeMap<String, Tensor> {
    fixtures().io(case)
}

fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn uses_mask(case: &str) -> bool {
    fixtures().manifest[case]["use_mask"]
        .as_bool()
        .expect("use_mask")
}

fn run(enc: &TextEncoder, case: &str) -> TextEncoderOutput {
    let io = io(case);
    let _guard = tch::no_grad_guard();
    let mask = uses_mask(case).then(|| io["attention_mask"].shallow_clone());
    enc.encode_masked(&io["input_ids"], mask.as_ref())
        .expect("encode")
}

/// Compares every output with transformers'; returns the largest error.
fn compare(case: &str, out: &TextEncoderOutput) -> f64 {
    let io = io(case);
    let n = out.hidden_states.len();
    assert_eq!(
        n,
        fixtures().manifest[case]["config"]["num_hidden_layers"]
            .as_u64()
            .unwrap() as usize
            + 1,
        "`{case}`: embeddings + one hidden state per layer"
    );
    let mut worst = 0.0f64;
    let mut check = |what: &str, got: &Tensor, want: &Tensor| {
        let err = max_err(got, want);
        println!("clip parity `{case}` {what}: max abs error {err:.3e}");
        assert!(
            err <= TOL,
            "`{case}` {what}: max abs error {err:e} > {TOL:e}"
        );
        worst = worst.max(err);
    };
    for (i, h) in out.hidden_states.iter().enumerate() {
        check(
            &format!("hidden_states[{i}]"),
            h,
            &io[&format!("hidden_states.{i}")],
        );
    }
    check(
        "penultimate",
        out.penultimate(),
        &io[&format!("hidden_states.{}", n - 2)],
    );
    check(
        "last_hidden_state",
        &out.last_hidden_state,
        &io["last_hidden_state"],
    );
    check("pooled", &out.pooled, &io["pooled"]);
    match (&out.text_embeds, io.get("text_embeds")) {
        (Some(got), Some(want)) => check("text_embeds", got, want),
        (None, None) => {}
        (got, want) => panic!(
            "`{case}`: text_embeds present in rust: {}, in transformers: {}",
            got.is_some(),
            want.is_some()
        ),
    }
    worst
}

fn load(dir: &Path) -> TextEncoder {
    TextEncoder::load(dir, Device::Cpu, Kind::Float).expect("load encoder")
}

fn parity(case: &str) {
    let enc = load(&fixtures().root.join(case).join("model"));
    let out = run(&enc, case);
    let worst = compare(case, &out);
    println!("clip parity `{case}`: worst {worst:.3e}");
}

#[test]
fn parity_clip_text_model_legacy_eos_quick_gelu() {
    parity("legacy_quick_gelu");
}

#[test]
fn parity_with_projection_gelu_first_eos() {
    parity("proj_gelu");
}

#[test]
fn parity_attention_mask_pad_not_eos_gelu_tanh() {
    parity("masked_tanh");
}

#[test]
fn parity_with_projection_legacy_eos() {
    parity("legacy_proj_short");
}

#[test]
fn first_eos_rule_differs_from_argmax_here() {
    // The non-legacy case only tests the first-EOS rule if argmax(ids) points elsewhere.
    let io = io("proj_gelu");
    let ids = &io["input_ids"];
    let argmax = ids.argmax(-1, false);
    let first_eos = ids.eq(7).to_kind(Kind::Int).argmax(-1, false);
    assert!(
        argmax.ne_tensor(&first_eos).any().int64_value(&[]) != 0,
        "fixture ids do not tell the two pooling rules apart"
    );
}

#[test]
fn prefixed_layout_of_plain_model_loads() {
    // transformers 5 saves a plain CLIPTextModel without `text_model.`; the released
    // checkpoints (and save_pretrained here) use the prefix. Both must give the same outputs.
    for case in ["legacy_quick_gelu", "masked_tanh"] {
        let plain = run(&load(&fixtures().root.join(case).join("model")), case);
        let prefixed = run(&load(&fixtures().root.join(case).join("prefixed")), case);
        assert_eq!(
            max_err(&plain.last_hidden_state, &prefixed.last_hidden_state),
            0.0
        );
        compare(case, &prefixed);
    }
}

#[test]
fn save_pretrained_writes_transformers_names_and_round_trips() {
    for (case, reference) in [("proj_gelu", "model"), ("legacy_quick_gelu", "prefixed")] {
        let enc = load(&fixtures().root.join(case).join("model"));
        let dir = tempfile::tempdir().unwrap();
        enc.save_pretrained(dir.path()).expect("save");
        let saved = MappedSafetensors::open(dir.path().join("model.safetensors"))
            .unwrap()
            .names();
        let want = MappedSafetensors::open(
            fixtures()
                .root
                .join(case)
                .join(reference)
                .join("model.safetensors"),
        )
        .unwrap()
        .names();
        assert_eq!(
            saved, want,
            "`{case}`: saved names differ from transformers'"
        );
        let again = load(dir.path());
        assert_eq!(again.config(), enc.config());
        assert_eq!(again.with_projection(), enc.with_projection());
        let (a, b) = (run(&enc, case), run(&again, case));
        assert_eq!(max_err(&a.last_hidden_state, &b.last_hidden_state), 0.0);
        assert_eq!(max_err(&a.pooled, &b.pooled), 0.0);
        let arch = serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(dir.path().join("config.json")).unwrap(),
        )
        .unwrap()["architectures"][0]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(arch, fixtures().manifest[case]["cls"].as_str().unwrap());
    }
}

fn rewrite_checkpoint(
    case: &str,
    label: &str,
    edit: impl FnOnce(&mut BTreeMap<String, Tensor>),
) -> PathBuf {
    let src = fixtures().root.join(case).join("model");
    let mut tensors = MappedSafetensors::open(src.join("model.safetensors"))
        .unwrap()
        .all()
        .unwrap();
    edit(&mut tensors);
    let dir = fixtures().root.join(format!("edited-{case}-{label}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    save_safetensors(dir.join("model.safetensors"), &list, &BTreeMap::new()).unwrap();
    dir
}

#[test]
fn strict_loading_names_missing_and_unused_tensors() {
    let extra = rewrite_checkpoint("proj_gelu", "extra", |t| {
        t.insert(
            "text_model.extra.weight".into(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        );
    });
    let err = TextEncoder::load(&extra, Device::Cpu, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(err.contains("text_model.extra.weight"), "{err}");

    let missing = rewrite_checkpoint("proj_gelu", "missing", |t| {
        t.remove("text_model.encoder.layers.1.mlp.fc2.bias");
    });
    let err = TextEncoder::load(&missing, Device::Cpu, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("text_model.encoder.layers.1.mlp.fc2.bias"),
        "{err}"
    );

    let reshaped = rewrite_checkpoint("legacy_quick_gelu", "shape", |t| {
        t.insert(
            "final_layer_norm.weight".into(),
            Tensor::ones([31], (Kind::Float, Device::Cpu)),
        );
    });
    let err = TextEncoder::load(&reshaped, Device::Cpu, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("final_layer_norm.weight") && err.contains("31"),
        "{err}"
    );
}

#[test]
fn missing_eos_is_an_error_outside_legacy_pooling() {
    let enc = load(&fixtures().root.join("proj_gelu").join("model"));
    let ids = Tensor::from_slice(&[6i64, 9, 10, 7, 6, 9, 10, 11]).view([2, 4]);
    let err = enc.encode(&ids).unwrap_err().to_string();
    assert!(
        err.contains("[1]") && err.contains("eos_token_id 7"),
        "{err}"
    );
    let too_long = Tensor::full([1, 17], 7, (Kind::Int64, Device::Cpu));
    let err = enc.encode(&too_long).unwrap_err().to_string();
    assert!(err.contains("max_position_embeddings"), "{err}");
    let out_of_vocab = Tensor::from_slice(&[6i64, 100, 7]).view([1, 3]);
    let err = enc.encode(&out_of_vocab).unwrap_err().to_string();
    assert!(err.contains("vocabulary"), "{err}");
}

#[test]
fn bf16_weights_track_fp32() {
    let case = "proj_gelu";
    let dir = fixtures().root.join(case).join("model");
    let enc = TextEncoder::load(&dir, Device::Cpu, Kind::BFloat16).expect("bf16 load");
    assert!(enc
        .vs()
        .variables()
        .values()
        .all(|t| t.kind() == Kind::BFloat16));
    let out = run(&enc, case);
    let err = max_err(&out.last_hidden_state, &io(case)["last_hidden_state"]);
    println!("clip bf16 vs transformers fp32 `{case}`: max abs error {err:.3e}");
    assert!(err < 0.15, "bf16 drifted too far: {err}");
}

#[test]
fn random_init_round_trips_through_save_pretrained() {
    let mut cfg = ClipTextConfig {
        vocab_size: 50,
        hidden_size: 16,
        intermediate_size: 32,
        projection_dim: Some(8),
        num_hidden_layers: 2,
        num_attention_heads: 2,
        max_position_embeddings: 12,
        bos_token_id: Some(0),
        eos_token_id: 1,
        pad_token_id: Some(1),
        ..ClipTextConfig::default()
    };
    tch::manual_seed(3);
    let enc = TextEncoder::random(&cfg, true, Device::Cpu).unwrap();
    let vars = enc.vs().variables();
    let tok = &vars["text_model.embeddings.token_embedding.weight"];
    let std = tok.std(true).double_value(&[]);
    assert!((std - 0.02).abs() < 0.004, "token embedding std {std}");
    let ln = &vars["text_model.final_layer_norm.weight"];
    assert_eq!(ln.min().double_value(&[]), 1.0);
    let dir = tempfile::tempdir().unwrap();
    enc.save_pretrained(dir.path()).unwrap();
    let again = load(dir.path());
    let ids = Tensor::from_slice(&[0i64, 5, 9, 1, 1, 1, 0, 7, 1, 1, 1, 1]).view([2, 6]);
    let _guard = tch::no_grad_guard();
    let (a, b) = (enc.encode(&ids).unwrap(), again.encode(&ids).unwrap());
    assert_eq!(a.text_embeds.as_ref().unwrap().size(), [2, 8]);
    assert_eq!(a.hidden_states.len(), 3);
    assert_eq!(
        max_err(
            a.text_embeds.as_ref().unwrap(),
            b.text_embeds.as_ref().unwrap()
        ),
        0.0
    );
    // A projection without projection_dim is refused.
    cfg.projection_dim = None;
    assert!(TextEncoder::random(&cfg, true, Device::Cpu).is_err());
}

/// SD 1.5's text_encoder/config.json as transformers 4.x wrote it: bookkeeping keys must be
/// skipped and the architecture must match the CLIP-L preset.
const SD15_TEXT_ENCODER_CONFIG: &str = r#"{
  "_name_or_path": "openai/clip-vit-large-patch14",
  "architectures": ["CLIPTextModel"],
  "attention_dropout": 0.0,
  "bos_token_id": 0,
  "dropout": 0.0,
  "eos_token_id": 2,
  "hidden_act": "quick_gelu",
  "hidden_size": 768,
  "initializer_factor": 1.0,
  "initializer_range": 0.02,
  "intermediate_size": 3072,
  "layer_norm_eps": 1e-05,
  "max_position_embeddings": 77,
  "model_type": "clip_text_model",
  "num_attention_heads": 12,
  "num_hidden_layers": 12,
  "pad_token_id": 1,
  "projection_dim": 768,
  "torch_dtype": "float32",
  "transformers_version": "4.22.0.dev0",
  "vocab_size": 49408
}"#;

#[test]
fn config_reads_transformers_json_and_rejects_unknown_keys() {
    let parsed =
        ClipTextConfig::from_json(serde_json::from_str(SD15_TEXT_ENCODER_CONFIG).unwrap()).unwrap();
    assert_eq!(parsed, ClipTextConfig::clip_l());
    for name in ClipTextConfig::PRESETS {
        ClipTextConfig::preset(name).unwrap().validate().unwrap();
    }
    assert!(ClipTextConfig::preset("clip-xl").is_err());

    // Every config transformers 5 wrote for the fixtures parses.
    for case in ["legacy_quick_gelu", "proj_gelu", "masked_tanh"] {
        let path = fixtures().root.join(case).join("model").join("config.json");
        ClipTextConfig::from_file(&path).unwrap();
    }

    let mut v: serde_json::Value = serde_json::from_str(SD15_TEXT_ENCODER_CONFIG).unwrap();
    v["use_rotary_positions"] = true.into();
    let err = ClipTextConfig::from_json(v).unwrap_err().to_string();
    assert!(err.contains("use_rotary_positions"), "{err}");

    let mut v: serde_json::Value = serde_json::from_str(SD15_TEXT_ENCODER_CONFIG).unwrap();
    v["model_type"] = "t5".into();
    let err = ClipTextConfig::from_json(v).unwrap_err().to_string();
    assert!(err.contains("t5"), "{err}");

    let mut v: serde_json::Value = serde_json::from_str(SD15_TEXT_ENCODER_CONFIG).unwrap();
    v["hidden_act"] = "relu".into();
    let err = ClipTextConfig::from_json(v).unwrap_err().to_string();
    assert!(err.contains("relu"), "{err}");

    let mut v: serde_json::Value = serde_json::from_str(SD15_TEXT_ENCODER_CONFIG).unwrap();
    v["num_attention_heads"] = 7.into();
    let err = ClipTextConfig::from_json(v).unwrap_err().to_string();
    assert!(err.contains("num_attention_heads"), "{err}");

    // A full CLIPConfig is read through its text_config.
    let full = serde_json::json!({
        "model_type": "clip",
        "text_config": serde_json::from_str::<serde_json::Value>(SD15_TEXT_ENCODER_CONFIG).unwrap(),
        "vision_config": {"hidden_size": 1024},
        "projection_dim": 768
    });
    assert_eq!(
        ClipTextConfig::from_json(full).unwrap(),
        ClipTextConfig::clip_l()
    );
}
