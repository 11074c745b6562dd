//! Text encoders, tokenizers, the VAE, `softalign forward` on their folders and
//! `softalign import-tokens`, against transformers 5.23.0 / diffusers 0.42.1 / torch on tiny
//! random models written by `tests/python/codecs_*.py` (each run once per test binary).
mod common;
/// Fuzz targets and the hostile-file corpus (readers of untrusted bytes).
mod fuzz;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use softalign_backbones::clip::ClipTokenizer;
use softalign_backbones::t5::{T5Encoder, T5Tokenizer};
use softalign_backbones::vae::{AutoencoderKl, VaeConfig};
use softalign_core::tensors::MappedSafetensors;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

struct Dir {
    _dir: tempfile::TempDir,
    root: PathBuf,
    manifest: serde_json::Value,
}

impl Dir {
    fn new(script: &str) -> Self {
        let dir = common::python_fixture(script);
        let manifest = common::read_json(dir.path(), "manifest.json");
        Self {
            root: dir.path().to_path_buf(),
            _dir: dir,
            manifest,
        }
    }
}

fn text() -> &'static Dir {
    static F: OnceLock<Dir> = OnceLock::new();
    F.get_or_init(|| Dir::new("codecs_text.py"))
}

fn read(path: &Path) -> BTreeMap<String, Tensor> {
    MappedSafetensors::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .all()
        .unwrap()
}

fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> f64 {
    let err = max_err(got, want);
    println!("{what}: max abs error {err:.3e}");
    assert!(err <= tol, "{what}: max abs error {err:e} > {tol:e}");
    err
}

// ---------------------------------------------------------------- T5

fn t5_case(case: &str) -> (T5Encoder, BTreeMap<String, Tensor>) {
    let d = text().root.join("t5").join(case);
    let enc = T5Encoder::load(d.join("model"), Device::Cpu, Kind::Float).expect("load T5");
    (enc, read(&d.join("io.safetensors")))
}

fn t5_parity(case: &str) {
    let (enc, io) = t5_case(case);
    let _guard = tch::no_grad_guard();
    let out = enc.encode(&io["input_ids"]).unwrap();
    let layers = text().manifest["t5"][case]["num_layers"].as_u64().unwrap() as usize;
    assert_eq!(out.hidden_states.len(), layers + 1);
    let mut worst = check(
        &format!("t5 `{case}` last_hidden_state"),
        &out.last_hidden_state,
        &io["last_hidden_state"],
        TOL,
    );
    for (i, h) in out.hidden_states.iter().enumerate() {
        worst = worst.max(check(
            &format!("t5 `{case}` hidden_states.{i}"),
            h,
            &io[&format!("hidden_states.{i}")],
            TOL,
        ));
    }
    let masked = enc
        .encode_masked(&io["input_ids"], Some(&io["attention_mask"]))
        .unwrap();
    worst = worst.max(check(
        &format!("t5 `{case}` masked last_hidden_state"),
        &masked.last_hidden_state,
        &io["masked.last_hidden_state"],
        TOL,
    ));
    // The mask must matter, or the masked comparison proves nothing.
    assert!(max_err(&masked.last_hidden_state, &out.last_hidden_state) > 1e-2);
    println!("t5 parity `{case}`: worst {worst:.3e}");
}

#[test]
fn t5_gated_gelu_matches_transformers() {
    t5_parity("gated_gelu");
}

#[test]
fn t5_relu_matches_transformers() {
    t5_parity("relu");
}

#[test]
fn t5_bf16_tracks_fp32_and_fp16_is_refused() {
    let d = text().root.join("t5").join("gated_gelu");
    let err = T5Encoder::load(d.join("model"), Device::Cpu, Kind::Half)
        .unwrap_err()
        .to_string();
    assert!(err.contains("fp16"), "{err}");
    let enc = T5Encoder::load(d.join("model"), Device::Cpu, Kind::BFloat16).unwrap();
    assert!(enc
        .vs()
        .variables()
        .values()
        .all(|t| t.kind() == Kind::BFloat16));
    let io = read(&d.join("io.safetensors"));
    let _guard = tch::no_grad_guard();
    let out = enc.encode(&io["input_ids"]).unwrap();
    assert_eq!(out.last_hidden_state.kind(), Kind::BFloat16);
    let fp32 = max_err(&out.last_hidden_state, &io["last_hidden_state"]);
    let err = max_err(&out.last_hidden_state, &io["bf16.last_hidden_state"]);
    println!("t5 bf16 vs transformers bf16: max abs error {err:.3e} (vs fp32: {fp32:.3e})");
    // Both run bf16 weights; kernels may round differently, much less than bf16 vs fp32.
    assert!(
        err < 0.5 * fp32,
        "bf16 path differs from transformers' bf16: {err}"
    );
}

#[test]
fn t5_save_pretrained_round_trips_and_loading_is_strict() {
    let (enc, io) = t5_case("gated_gelu");
    let dir = tempfile::tempdir().unwrap();
    enc.save_pretrained(dir.path()).unwrap();
    let original =
        MappedSafetensors::open(text().root.join("t5/gated_gelu/model/model.safetensors"))
            .unwrap()
            .names();
    let saved = MappedSafetensors::open(dir.path().join("model.safetensors"))
        .unwrap()
        .names();
    assert_eq!(saved, original, "names as transformers writes them");
    let again = T5Encoder::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(again.config(), enc.config());
    let _guard = tch::no_grad_guard();
    let (a, b) = (
        enc.encode(&io["input_ids"]).unwrap(),
        again.encode(&io["input_ids"]).unwrap(),
    );
    assert_eq!(max_err(&a.last_hidden_state, &b.last_hidden_state), 0.0);

    // A checkpoint holding only `encoder.embed_tokens.weight` (no `shared.weight`) loads the
    // same; an extra tensor is named.
    let mut t = read(&dir.path().join("model.safetensors"));
    let shared = t.remove("shared.weight").unwrap();
    t.insert("encoder.embed_tokens.weight".into(), shared);
    let alt = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join("config.json"),
        alt.path().join("config.json"),
    )
    .unwrap();
    let write = |t: &BTreeMap<String, Tensor>| {
        let list: Vec<(String, Tensor)> = t
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        softalign_core::tensors::save_safetensors(
            alt.path().join("model.safetensors"),
            &list,
            &BTreeMap::new(),
        )
        .unwrap();
    };
    write(&t);
    let c = T5Encoder::load(alt.path(), Device::Cpu, Kind::Float).unwrap();
    let out = c.encode(&io["input_ids"]).unwrap();
    assert_eq!(max_err(&out.last_hidden_state, &a.last_hidden_state), 0.0);
    t.insert(
        "decoder.block.0.layer.0.SelfAttention.q.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    );
    write(&t);
    let err = T5Encoder::load(alt.path(), Device::Cpu, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("decoder.block.0.layer.0.SelfAttention.q.weight"),
        "{err}"
    );
}

#[test]
fn t5_config_refuses_what_is_not_implemented() {
    use softalign_backbones::t5::T5Config;
    let base = serde_json::json!({"model_type": "t5", "d_model": 8, "d_kv": 2, "d_ff": 4,
        "num_layers": 1, "num_heads": 4, "feed_forward_proj": "gated-gelu",
        "num_decoder_layers": 1, "task_specific_params": {}});
    let cfg = T5Config::from_json(base.clone()).unwrap();
    assert!(cfg.is_gated());
    for (key, value, expect) in [
        ("model_type", serde_json::json!("umt5"), "umt5"),
        ("is_decoder", serde_json::json!(true), "is_decoder"),
        ("feed_forward_proj", serde_json::json!("gated-tanh"), "tanh"),
        ("feed_forward_proj", serde_json::json!("a-b-c"), "a-b-c"),
        ("num_heads", serde_json::json!(0), "num_heads"),
    ] {
        let mut v = base.clone();
        v[key] = value;
        let err = T5Config::from_json(v).unwrap_err().to_string();
        assert!(err.contains(expect), "{key}: {err}");
    }
}

// ---------------------------------------------------------------- tokenizers

fn captions() -> Vec<String> {
    serde_json::from_value(text().manifest["captions"].clone()).unwrap()
}

fn expected_ids(v: &serde_json::Value) -> Vec<Vec<i64>> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn t5_tokenizer_ids_match_transformers() {
    let caps = captions();
    for n in [16usize, 256] {
        let tok = T5Tokenizer::from_file(text().root.join("t5_tok"), n).unwrap();
        assert_eq!(
            i64::from(tok.pad_id()),
            text().manifest["t5_pad_id"].as_i64().unwrap()
        );
        let want = expected_ids(&text().manifest["t5_ids"][n.to_string()]);
        for (c, w) in caps.iter().zip(&want) {
            let got = tok.encode_ids(c).unwrap();
            assert_eq!(&got, w, "T5 ids (max_length {n}) differ for {c:?}");
        }
        let refs: Vec<&str> = caps.iter().map(String::as_str).collect();
        let (ids, mask) = tok.encode_batch(&refs, Device::Cpu).unwrap();
        assert_eq!(ids.size(), [caps.len() as i64, n as i64]);
        let ids: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&ids).unwrap();
        assert_eq!(ids, want);
        // The empty prompt is `</s>` then padding; the mask covers `</s>` only.
        let row: Vec<i64> = Vec::<i64>::try_from(mask.get(3)).unwrap();
        assert_eq!(row.iter().sum::<i64>(), 1);
    }
    // Truncation keeps `</s>` last, as transformers' fast tokenizer does.
    let tok = T5Tokenizer::from_file(text().root.join("t5_tok"), 16).unwrap();
    let long = tok.encode_ids(&caps[5]).unwrap();
    assert_eq!(long[15], i64::from(tok.eos_id()));
}

#[test]
fn clip_bpe_from_vocab_and_merges_matches_transformers() {
    let tok = ClipTokenizer::from_folder(text().root.join("clip_bpe"), 77).unwrap();
    assert_eq!(
        i64::from(tok.pad_id()),
        text().manifest["clip_pad_id"].as_i64().unwrap()
    );
    let caps = captions();
    let want = expected_ids(&text().manifest["clip_ids"]);
    for (c, w) in caps.iter().zip(&want) {
        assert_eq!(&tok.encode_ids(c).unwrap(), w, "CLIP ids differ for {c:?}");
    }
    // The merges apply (one id per known word), so the BPE path is really exercised.
    let ids = tok.encode_ids("a RED cube").unwrap();
    assert_eq!(ids[2], i64::from(tok.token_to_id("red</w>").unwrap()));
    let err = ClipTokenizer::from_folder(text().root.join("t5"), 77).unwrap_err();
    assert!(err.to_string().contains("merges.txt"), "{err}");
}

// ---------------------------------------------------------------- VAE

fn vae_dir() -> &'static Dir {
    static F: OnceLock<Dir> = OnceLock::new();
    F.get_or_init(|| Dir::new("codecs_vae.py"))
}

fn vae_case(case: &str) -> (AutoencoderKl, BTreeMap<String, Tensor>) {
    let d = vae_dir().root.join(case);
    let vae = AutoencoderKl::load(d.join("vae"), Device::Cpu, Kind::Float).expect("load VAE");
    (vae, read(&d.join("io.safetensors")))
}

fn vae_parity(case: &str) {
    let (vae, io) = vae_case(case);
    let _guard = tch::no_grad_guard();
    // Non-degenerate references, so an exact match means something.
    for k in ["latent_dist.mean", "decoded"] {
        assert!(io[k].std(true).double_value(&[]) > 1e-2, "`{k}` is flat");
    }
    let post = vae.encode(&io["sample"]).unwrap();
    let mut worst = check(
        &format!("vae `{case}` latent_dist.mean"),
        &post.mean,
        &io["latent_dist.mean"],
        TOL,
    );
    worst = worst.max(check(
        &format!("vae `{case}` latent_dist.std"),
        &post.std,
        &io["latent_dist.std"],
        TOL,
    ));
    let decoded = vae.decode(&io["latents"]).unwrap();
    worst = worst.max(check(
        &format!("vae `{case}` decode"),
        &decoded,
        &io["decoded"],
        TOL,
    ));
    // The scaling constants are the folder's.
    let m = &vae_dir().manifest[case];
    assert_eq!(
        vae.config().scaling_factor,
        m["scaling_factor"].as_f64().unwrap()
    );
    assert_eq!(vae.config().shift_factor, m["shift_factor"].as_f64());
    let scaled = vae.scale_latents(&post.mean);
    let want = (&post.mean - m["shift_factor"].as_f64().unwrap_or(0.0))
        * m["scaling_factor"].as_f64().unwrap();
    assert_eq!(max_err(&scaled, &want), 0.0);
    assert!(max_err(&vae.unscale_latents(&scaled), &post.mean) < 1e-6);
    let images = vae.latents_to_images(&io["latents"]).unwrap();
    let want = vae
        .decode(&vae.unscale_latents(&io["latents"]))
        .unwrap()
        .clamp(-1.0, 1.0);
    assert_eq!(max_err(&images, &want), 0.0);
    println!("vae parity `{case}`: worst {worst:.3e}");
}

#[test]
fn vae_4_channel_with_quant_convs_matches_diffusers() {
    let (vae, _) = vae_case("kl4_quant");
    assert!(vae.quant_conv.is_some() && vae.post_quant_conv.is_some());
    vae_parity("kl4_quant");
}

#[test]
fn vae_16_channel_sd3_without_quant_convs_matches_diffusers() {
    let (vae, _) = vae_case("kl16_sd3");
    assert!(vae.quant_conv.is_none() && vae.post_quant_conv.is_none());
    vae_parity("kl16_sd3");
}

#[test]
fn vae_posterior_sample_matches_diffusers_global_generator() {
    let (vae, io) = vae_case("kl4_quant");
    let _guard = tch::no_grad_guard();
    let post = vae.encode(&io["sample"]).unwrap();
    // Other tests in this binary do not draw from the global generator.
    tch::manual_seed(123);
    let sample = post.sample();
    check(
        "vae posterior sample (seed 123)",
        &sample,
        &io["latent_dist.sample"],
        TOL,
    );
    let noise = (&io["latent_dist.sample"] - &post.mean) / &post.std;
    let again = post.sample_with(&noise).unwrap();
    assert!(max_err(&again, &io["latent_dist.sample"]) < TOL);
    assert!(post.sample_with(&noise.narrow(0, 0, 1)).is_err());
}

#[test]
fn vae_rejects_bad_inputs_and_round_trips_save() {
    let (vae, io) = vae_case("kl16_sd3");
    let bad = Tensor::zeros([1, 3, 15, 12], (Kind::Float, Device::Cpu));
    let err = vae.encode(&bad).unwrap_err().to_string();
    assert!(err.contains("multiples of 2"), "{err}");
    let err = vae.decode(&io["sample"]).unwrap_err().to_string();
    assert!(err.contains("latents") && err.contains("16"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    vae.save_pretrained(dir.path()).unwrap();
    let again = AutoencoderKl::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(again.config(), vae.config());
    let _guard = tch::no_grad_guard();
    let (a, b) = (
        vae.decode(&io["latents"]).unwrap(),
        again.decode(&io["latents"]).unwrap(),
    );
    assert_eq!(max_err(&a, &b), 0.0);
    let cfg = vae_dir().root.join("kl16_sd3/vae/config.json");
    let text = std::fs::read_to_string(cfg).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["up_block_types"][0] = "AttnUpDecoderBlock2D".into();
    let err = VaeConfig::from_json(v.clone()).unwrap_err().to_string();
    assert!(err.contains("AttnUpDecoderBlock2D"), "{err}");
    v["up_block_types"][0] = "UpDecoderBlock2D".into();
    v["use_tiny_decoder"] = true.into();
    let err = VaeConfig::from_json(v).unwrap_err().to_string();
    assert!(err.contains("use_tiny_decoder"), "{err}");
}

// ---------------------------------------------------------------- softalign forward

fn softalign(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(args)
        .output()
        .expect("run softalign")
}

/// Runs `softalign forward --model DIR` on the named tensors of `io` and returns its outputs.
fn cli_forward(
    dir: &Path,
    io: &BTreeMap<String, Tensor>,
    names: &[&str],
) -> BTreeMap<String, Tensor> {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in.safetensors");
    let list: Vec<(String, Tensor)> = names
        .iter()
        .map(|n| (n.to_string(), io[*n].shallow_clone()))
        .collect();
    softalign_core::tensors::save_safetensors(&inputs, &list, &BTreeMap::new()).unwrap();
    let output = tmp.path().join("out.safetensors");
    let o = softalign(&[
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(
        o.status.success(),
        "softalign forward failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    read(&output)
}

#[test]
fn forward_cli_on_clip_with_projection_folder() {
    let d = text().root.join("clip_proj");
    let io = read(&d.join("io.safetensors"));
    let out = cli_forward(&d.join("model"), &io, &["input_ids"]);
    let layers = text().manifest["clip_proj_layers"].as_u64().unwrap();
    let mut names = vec![
        "last_hidden_state".to_string(),
        "pooler_output".into(),
        "text_embeds".into(),
    ];
    names.extend((0..=layers).map(|i| format!("hidden_states.{i}")));
    names.sort();
    assert_eq!(out.keys().cloned().collect::<Vec<_>>(), names);
    for n in &names {
        check(&format!("forward cli clip `{n}`"), &out[n], &io[n], TOL);
    }
}

#[test]
fn forward_cli_on_t5_folder() {
    let d = text().root.join("t5").join("gated_gelu");
    let io = read(&d.join("io.safetensors"));
    let out = cli_forward(&d.join("model"), &io, &["input_ids"]);
    assert!(!out.contains_key("pooler_output"));
    for n in ["last_hidden_state", "hidden_states.0", "hidden_states.3"] {
        check(&format!("forward cli t5 `{n}`"), &out[n], &io[n], TOL);
    }
    let masked = cli_forward(&d.join("model"), &io, &["input_ids", "attention_mask"]);
    check(
        "forward cli t5 masked",
        &masked["last_hidden_state"],
        &io["masked.last_hidden_state"],
        TOL,
    );
}

#[test]
fn forward_cli_on_vae_folders() {
    for case in ["kl4_quant", "kl16_sd3"] {
        let d = vae_dir().root.join(case);
        let io = read(&d.join("io.safetensors"));
        let out = cli_forward(&d.join("vae"), &io, &["sample", "latents"]);
        check(
            &format!("forward cli vae `{case}` mean"),
            &out["latent_dist.mean"],
            &io["latent_dist.mean"],
            TOL,
        );
        check(
            &format!("forward cli vae `{case}` std"),
            &out["latent_dist.std"],
            &io["latent_dist.std"],
            TOL,
        );
        check(
            &format!("forward cli vae `{case}` decode"),
            &out["sample"],
            &io["decoded"],
            TOL,
        );
    }
    // Decode only.
    let d = vae_dir().root.join("kl16_sd3");
    let io = read(&d.join("io.safetensors"));
    let out = cli_forward(&d.join("vae"), &io, &["latents"]);
    assert_eq!(out.keys().collect::<Vec<_>>(), ["sample"]);
}

// ---------------------------------------------------------------- import-tokens

fn tokens_dir() -> &'static Path {
    static F: OnceLock<tempfile::TempDir> = OnceLock::new();
    F.get_or_init(|| common::python_fixture("codecs_tokens.py"))
        .path()
}

/// Runs import-tokens on `case` and returns the written file's tensors and metadata.
fn import(
    case: &str,
    backbone: &str,
) -> (
    BTreeMap<String, Tensor>,
    std::collections::HashMap<String, String>,
) {
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("tokens.safetensors");
    let o = softalign(&[
        "import-tokens",
        tokens_dir().join(case).to_str().unwrap(),
        "--backbone",
        backbone,
        "--output",
        file.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "import-tokens {case} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let m = MappedSafetensors::open(&file).unwrap();
    (m.all().unwrap(), m.metadata().unwrap())
}

#[test]
fn import_tokens_sd3_released_layout() {
    let reference = read(&tokens_dir().join("sd3/reference.safetensors"));
    let (t, meta) = import("sd3", "sd3");
    assert_eq!(t["default.tokens"].size(), [5, 4, 1536]);
    assert_eq!(max_err(&t["default.tokens"], &reference["tokens"]), 0.0);
    assert_eq!(t["time_table"].size(), [100, 7680]);
    assert_eq!(max_err(&t["time_table"], &reference["time_table"]), 0.0);
    assert_eq!(meta["adapter"], "soft_tokens");
    assert_eq!(meta["token_space"], "joint");
    assert_eq!(meta["time_buckets"], "100");
    let sites: Vec<String> = serde_json::from_str(&meta["sites"]).unwrap();
    assert_eq!(
        sites,
        (0..5)
            .map(|i| format!("joint_blocks.{i}"))
            .collect::<Vec<_>>()
    );
    // The file loads back as soft tokens for an SD3-shaped backbone with those sites.
    let spec: softalign_core::adapter::soft_tokens::SoftTokensSpec =
        serde_json::from_str(&meta["spec"]).unwrap();
    assert!(!spec.shared_time_row);

    // Tokens trained by the current reference code live in the T5 (context) space.
    let (t, meta) = import("sd3_context", "sd3");
    assert_eq!(t["default.tokens"].size(), [5, 4, 4096]);
    assert_eq!(meta["token_space"], "context");
}

#[test]
fn import_tokens_unet_layouts() {
    let reference = read(&tokens_dir().join("sd15/reference.safetensors"));
    let (t, meta) = import("sd15", "sd15");
    assert_eq!(t["default.tokens"].size(), [1, 4, 768]);
    assert_eq!(
        max_err(&t["default.tokens"].get(0), &reference["tokens"]),
        0.0
    );
    assert_eq!(max_err(&t["time_table"], &reference["time_table"]), 0.0);
    assert_eq!(meta["sites"], r#"["down"]"#);
    let spec: softalign_core::adapter::soft_tokens::SoftTokensSpec =
        serde_json::from_str(&meta["spec"]).unwrap();
    assert!(spec.shared_time_row);

    let reference = read(&tokens_dir().join("sdxl/reference.safetensors"));
    let (t, meta) = import("sdxl", "sdxl");
    // One block shared by `down` and `mid`, as the reference.
    assert_eq!(t["default.tokens"].size(), [1, 4, 2048]);
    assert_eq!(
        max_err(&t["default.tokens"].get(0), &reference["tokens"]),
        0.0
    );
    let spec: softalign_core::adapter::soft_tokens::SoftTokensSpec =
        serde_json::from_str(&meta["spec"]).unwrap();
    assert!(spec.shared_tokens);
    assert!(!t.contains_key("time_table"));
    assert_eq!(meta["sites"], r#"["down","mid"]"#);
    assert_eq!(meta["time_buckets"], "0");
}

#[test]
fn import_tokens_refuses_mismatched_backbones_and_reads_strided_storage() {
    // SD3 tokens are not SD1.5 tokens.
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("x.safetensors");
    let o = softalign(&[
        "import-tokens",
        tokens_dir().join("sd3").to_str().unwrap(),
        "--backbone",
        "sd15",
        "--output",
        file.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("768") && err.contains("[5, 4, 1536]"), "{err}");
    assert!(!file.exists());
    // A non-contiguous saved view (SDXL-shaped) comes back with its values: strides and the
    // storage offset are honoured.
    let reference = read(&tokens_dir().join("strided/reference.safetensors"));
    let (t, _) = import("strided", "sdxl");
    assert_eq!(
        max_err(&t["default.tokens"].get(0), &reference["tokens"]),
        0.0
    );
}
