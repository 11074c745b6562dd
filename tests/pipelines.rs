//! Full diffusers pipeline folders (SD 1.5-, SDXL- and SD3-shaped, tiny random weights built by
//! diffusers): prompt conditioning equal to each pipeline's own `encode_prompt`, and the
//! researcher's path `softalign cache` -> `softalign train` -> `softalign sample` on them.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::Fixtures;
use softalign_backbones::unet::spec::sdxl_time_ids;
use softalign_core::backbone::{Backbone, Conditioning};
use softalign_core::plugin::{BackboneSpec, BuildContext};
use softalign_core::tensors::MappedSafetensors;
use tch::{Device, Kind, Tensor};

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| Fixtures::new("pipelines_fixtures.py"))
}

fn build(spec: serde_json::Value) -> Box<dyn Backbone> {
    let spec: Box<dyn BackboneSpec> = serde_json::from_value(spec).unwrap();
    let ctx = BuildContext {
        device: Device::Cpu,
        recipe_dir: ".".into(),
        dtype_override: None,
        empty_prompt: Default::default(),
    };
    spec.build(&ctx).unwrap()
}

fn max_err(got: &Tensor, want: &Tensor, what: &str) -> f64 {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let e = (got.to_kind(Kind::Float) - want)
        .abs()
        .max()
        .double_value(&[]);
    eprintln!("{what}: max |err| {e:.3e}");
    if !what.contains("negative") {
        // A real comparison: the reference varies across prompts and features.
        assert!(
            want.std(false).double_value(&[]) > 1e-3,
            "{what}: reference is constant"
        );
    }
    assert!(e <= 1e-4, "{what}: max |err| {e}");
    e
}

fn rows(c: &Conditioning, name: &str, n: i64) -> Tensor {
    let t = c.get(name).unwrap();
    t.expand(
        [n].iter()
            .chain(&t.size()[1..])
            .copied()
            .collect::<Vec<_>>(),
        false,
    )
}

#[test]
fn conditioning_matches_diffusers_encode_prompt() {
    let f = fixtures();
    let prompts: Vec<String> = f.manifest["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let n = prompts.len() as i64;
    let t5 = f.manifest["t5_length"].as_u64().unwrap();
    let refs = MappedSafetensors::open(f.root.join("reference.safetensors"))
        .unwrap()
        .all()
        .unwrap();
    let r = |k: &str| refs.get(k).unwrap_or_else(|| panic!("reference {k}"));
    let _guard = tch::no_grad_guard();

    let sd15 = build(serde_json::json!({"type": "unet", "path": f.root.join("sd15")}));
    let c = sd15.encode_prompts(&prompts).unwrap();
    max_err(
        c.get("encoder_hidden_states").unwrap(),
        r("sd15.prompt_embeds"),
        "sd15 prompt_embeds",
    );
    let u = sd15.null_conditioning().unwrap();
    max_err(
        &rows(&u, "encoder_hidden_states", n),
        r("sd15.negative_prompt_embeds"),
        "sd15 negative_prompt_embeds",
    );

    let sdxl = build(serde_json::json!({"type": "unet", "path": f.root.join("sdxl")}));
    let c = sdxl.encode_prompts(&prompts).unwrap();
    max_err(
        c.get("encoder_hidden_states").unwrap(),
        r("sdxl.prompt_embeds"),
        "sdxl prompt_embeds",
    );
    max_err(
        c.get("text_embeds").unwrap(),
        r("sdxl.pooled_prompt_embeds"),
        "sdxl pooled_prompt_embeds",
    );
    let u = sdxl.null_conditioning().unwrap();
    max_err(
        &rows(&u, "encoder_hidden_states", n),
        r("sdxl.negative_prompt_embeds"),
        "sdxl negative (force_zeros)",
    );
    max_err(
        &rows(&u, "text_embeds", n),
        r("sdxl.negative_pooled_prompt_embeds"),
        "sdxl negative pooled",
    );
    assert!(
        r("sdxl.negative_prompt_embeds")
            .abs()
            .sum(Kind::Float)
            .double_value(&[])
            == 0.0
    );
    let ids = sdxl_time_ids(1, 48, 32, Device::Cpu);
    max_err(&ids, r("sdxl.add_time_ids_48x32"), "sdxl add_time_ids");

    for name in ["sd3", "sd3_no_t5"] {
        let sd3 = build(serde_json::json!({
            "type": "sd3", "path": f.root.join(name), "t5_max_length": t5
        }));
        let c = sd3.encode_prompts(&prompts).unwrap();
        max_err(
            c.get("encoder_hidden_states").unwrap(),
            r(&format!("{name}.prompt_embeds")),
            &format!("{name} prompt_embeds"),
        );
        max_err(
            c.get("pooled_projections").unwrap(),
            r(&format!("{name}.pooled_prompt_embeds")),
            &format!("{name} pooled_prompt_embeds"),
        );
        let u = sd3.null_conditioning().unwrap();
        max_err(
            &rows(&u, "encoder_hidden_states", n),
            r(&format!("{name}.negative_prompt_embeds")),
            &format!("{name} negative_prompt_embeds"),
        );
        max_err(
            &rows(&u, "pooled_projections", n),
            r(&format!("{name}.negative_pooled_prompt_embeds")),
            &format!("{name} negative pooled"),
        );
        assert_eq!(
            c.get("encoder_hidden_states").unwrap().size()[1],
            77 + t5 as i64
        );
    }
}

fn softalign(args: &[&str], cwd: &Path) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "softalign {}:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Four 16 px images with two captions each, as an image manifest.
fn manifest(dir: &Path) {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let colours = [
        [200u8, 30, 30],
        [30, 30, 200],
        [30, 200, 30],
        [200, 200, 30],
    ];
    let words = ["red", "blue", "green", "yellow"];
    let mut lines = Vec::new();
    for (i, (c, w)) in colours.iter().zip(words).enumerate() {
        let img = image::RgbImage::from_fn(16, 16, |x, y| {
            if (x / 4 + y / 4) % 2 == 0 {
                image::Rgb(*c)
            } else {
                image::Rgb([10, 10, 10])
            }
        });
        img.save(data.join(format!("{i}.png"))).unwrap();
        lines.push(format!(
            r#"{{"image": "{i}.png", "captions": ["a {w} cube", "a photo of a {w} cube"]}}"#
        ));
    }
    std::fs::write(data.join("train.jsonl"), lines.join("\n")).unwrap();
}

fn recipe(backbone: &str, sites: &str) -> String {
    format!(
        r#"
name = "pipeline-e2e"
seed = 3

[backbone]
{backbone}

[[adapter]]
type = "soft_tokens"
tokens = 2
sites = {sites}
token_space = "joint"

[[objective]]
type = "softrepa_contrastive"
weight = 1.0

[data]
type = "encoded_cache"
path = "cache"
captions_per_sample = 2
source = {{ type = "image_manifest", path = "data/train.jsonl", resolution = 16 }}

[train]
steps = 2
images_per_step = 2
lr = 1e-2
"#
    )
}

fn cache_train_sample(name: &str, backbone: &str, sites: &str, size: (u32, u32), extra: &[&str]) {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    manifest(d);
    let folder = f.root.join(name);
    let backbone = backbone.replace("FOLDER", &folder.display().to_string());
    std::fs::write(d.join("r.toml"), recipe(&backbone, sites)).unwrap();

    let out = softalign(
        &["cache", "--quiet", "--batch", "3", "--recipe", "r.toml"],
        d,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cached 4 samples"), "{stderr}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("cache/manifest.json")).unwrap())
            .unwrap();
    let fields: Vec<&str> = m["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert!(fields.contains(&"x0.std"), "{fields:?}");
    assert!(fields.contains(&"cond.encoder_hidden_states"), "{fields:?}");

    // Training from the cache needs neither the text encoders nor the VAE.
    softalign(
        &[
            "train",
            "--quiet",
            "--recipe",
            "r.toml",
            "--run-dir",
            "run",
            "--set",
            "backbone.text_encoders=false",
            "--set",
            "backbone.vae=false",
        ],
        d,
    );
    let adapter = d.join("run/final/adapter.safetensors");
    assert!(adapter.is_file());

    let mut args = vec![
        "sample",
        "--quiet",
        "--model",
        folder.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "a red cube",
        "--prompt",
        "a blue cube",
        "--n",
        "1",
        "--steps",
        "2",
        "--out",
        "samples",
    ];
    args.extend_from_slice(extra);
    let out = softalign(&args, d);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{name}: {stderr}");
    for p in ["0000-00.png", "0001-00.png"] {
        let img = image::open(d.join("samples").join(p)).unwrap();
        assert_eq!((img.width(), img.height()), size, "{name} {p}");
    }
    if name == "sd3" {
        compact_cache_is_smaller_and_trains(d);
    } else {
        geneval_layout_from_real_metadata(d, &folder, &adapter);
    }
}

/// `softalign eval --geneval evaluation_metadata.jsonl` on a real pipeline: GenEval's folder
/// layout, unscored (GenEval's own detector judges it).
fn geneval_layout_from_real_metadata(d: &Path, folder: &Path, adapter: &Path) {
    let meta = d.join("evaluation_metadata.jsonl");
    std::fs::write(
        &meta,
        concat!(
            r#"{"tag": "single_object", "include": [{"class": "cube", "count": 1}], "prompt": "a photo of a cube"}"#,
            "\n",
            r#"{"tag": "colors", "include": [{"class": "cube", "count": 1, "color": "red"}], "prompt": "a photo of a red cube"}"#,
            "\n"
        ),
    )
    .unwrap();
    let out = softalign(
        &[
            "eval",
            "--quiet",
            "--model",
            folder.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--geneval",
            meta.to_str().unwrap(),
            "--n",
            "2",
            "--steps",
            "2",
            "--height",
            "24",
            "--width",
            "32",
            "--out",
            "geneval",
        ],
        d,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not scored"), "{stderr}");
    for (i, prompt) in ["a photo of a cube", "a photo of a red cube"]
        .iter()
        .enumerate()
    {
        let p = d.join(format!("geneval/{i:05}"));
        let line = std::fs::read_to_string(p.join("metadata.jsonl")).unwrap();
        assert!(line.contains(prompt), "{line}");
        for k in 0..2 {
            let img = image::open(p.join(format!("samples/{k:04}.png"))).unwrap();
            assert_eq!((img.width(), img.height()), (32, 24));
        }
    }
}

/// SD3's compact cache stores the context after the frozen context_embedder; training reads it
/// without the text encoders, and a recipe that disagrees about `compact` is refused.
fn compact_cache_is_smaller_and_trains(d: &Path) {
    let compact = [
        "--set",
        "data.compact=true",
        "--set",
        "data.path=\"cache-compact\"",
    ];
    let mut args = vec!["cache", "--quiet", "--recipe", "r.toml"];
    args.extend_from_slice(&compact);
    softalign(&args, d);
    let manifest = |dir: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join(dir).join("manifest.json")).unwrap())
            .unwrap()
    };
    let (plain, small) = (manifest("cache"), manifest("cache-compact"));
    let names = |m: &serde_json::Value| -> Vec<String> {
        m["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(names(&small).contains(&"cond.context_embeds".to_string()));
    assert!(!names(&small).contains(&"cond.encoder_hidden_states".to_string()));
    let (pb, sb) = (
        plain["record_bytes"].as_u64().unwrap(),
        small["record_bytes"].as_u64().unwrap(),
    );
    eprintln!("sd3 tiny cache record: {pb} bytes, compact {sb}");
    assert!(sb < pb, "compact {sb} >= plain {pb}");
    let mut args = vec![
        "train",
        "--quiet",
        "--recipe",
        "r.toml",
        "--run-dir",
        "run-compact",
        "--set",
        "backbone.text_encoders=false",
        "--set",
        "backbone.vae=false",
    ];
    args.extend_from_slice(&compact);
    softalign(&args, d);
    assert!(d.join("run-compact/final/adapter.safetensors").is_file());
    // The plain cache read by a recipe that asks for the compact one.
    let out = Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args([
            "train",
            "--quiet",
            "--recipe",
            "r.toml",
            "--run-dir",
            "run-x",
        ])
        .args(["--set", "data.compact=true"])
        .current_dir(d)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("stale encoding cache") && stderr.contains("compact"),
        "{stderr}"
    );
}

#[test]
fn sd3_cache_train_sample() {
    cache_train_sample(
        "sd3",
        "type = \"sd3\"\npath = \"FOLDER\"\nt5_max_length = 12",
        "\"joint_blocks[0..1]\"",
        (16, 16),
        &[],
    );
}

#[test]
fn sd15_cache_train_sample() {
    cache_train_sample(
        "sd15",
        "type = \"unet\"\npath = \"FOLDER\"",
        "[\"down\"]",
        (32, 24),
        &["--height", "24", "--width", "32"],
    );
}

/// `softalign` in `cwd`, expected to fail; its stderr.
fn softalign_fails(args: &[&str], cwd: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "softalign {} passed:\n{stderr}",
        args.join(" ")
    );
    stderr
}

/// `src` mirrored into `dst`: each entry a symlink, except those in `skip` (left out) and in
/// `copy` (copied, so a test can change them).
fn mirror(src: &Path, dst: &Path, skip: &[&str], copy: &[&str]) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if skip.contains(&name.as_str()) {
            continue;
        }
        if copy.contains(&name.as_str()) {
            std::fs::create_dir_all(dst.join(&name)).unwrap();
            for f in std::fs::read_dir(e.path()).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), dst.join(&name).join(f.file_name())).unwrap();
            }
        } else {
            std::os::unix::fs::symlink(e.path(), dst.join(&name)).unwrap();
        }
    }
}

fn build_err(spec: serde_json::Value) -> String {
    let spec: Box<dyn BackboneSpec> = serde_json::from_value(spec).unwrap();
    match spec.build(&BuildContext::cpu(".")) {
        Ok(_) => panic!("the backbone built"),
        Err(e) => e.to_string(),
    }
}

/// A pipeline whose model_index.json lists T5 but whose text_encoder_3 folder is missing (a
/// partial download) is refused, with or without the encoders loaded (the cache fingerprint
/// reads the folder too); `null` in model_index.json stays the deliberate no-T5 choice.
#[test]
fn a_listed_component_whose_folder_is_missing_is_an_error() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("sd3");
    mirror(&f.root.join("sd3"), &partial, &["text_encoder_3"], &[]);
    for encoders in [true, false] {
        let e = build_err(serde_json::json!({
            "type": "sd3", "path": partial, "t5_max_length": 12, "text_encoders": encoders
        }));
        assert!(
            e.contains("text_encoder_3") && e.contains("folder is missing"),
            "{e}"
        );
    }
    // recipe check finds it too, without loading weights.
    std::fs::write(
        dir.path().join("r.toml"),
        format!(
            "[backbone]\ntype = \"sd3\"\npath = \"{}\"\n[train]\nsteps = 1\nlr = 1e-3\n",
            partial.display()
        ),
    )
    .unwrap();
    let stderr = softalign_fails(&["recipe", "check", "r.toml"], dir.path());
    assert!(stderr.contains("text_encoder_3"), "{stderr}");
    let sd3 = build(serde_json::json!({
        "type": "sd3", "path": f.root.join("sd3_no_t5"), "t5_max_length": 12
    }));
    assert!(sd3.encode_prompts(&["a cube".into()]).is_ok());
}

/// The encoding cache's fingerprint changes with the weights' content (same shapes, same
/// header); the content digest is remembered beside the file and reused while the file's size
/// and modification time are unchanged.
#[test]
fn encoder_fingerprint_follows_weight_content() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sd15");
    mirror(&f.root.join("sd15"), &model, &[], &["vae"]);
    let spec = serde_json::json!({"type": "unet", "path": model});
    let before = build(spec.clone()).encoder_fingerprint().unwrap();
    let weights = model.join("vae/diffusion_pytorch_model.safetensors");
    let memo = model.join("vae/.diffusion_pytorch_model.safetensors.softalign-sha256.json");
    assert!(memo.is_file(), "the digest is remembered beside the file");

    // Another value in the last weight, same layout.
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&weights, &bytes).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
    std::fs::File::options()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let after = build(spec.clone()).encoder_fingerprint().unwrap();
    assert_ne!(
        before["vae"], after["vae"],
        "changed VAE weights went unnoticed"
    );
    assert_eq!(before["text"], after["text"]);

    // While size and mtime match, the remembered digest is used (no re-hash).
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&memo).unwrap()).unwrap();
    m["sha256"] = "remembered".into();
    std::fs::write(&memo, m.to_string()).unwrap();
    let fp = build(spec).encoder_fingerprint().unwrap();
    assert!(
        fp["vae"].to_string().contains("remembered"),
        "{}",
        fp["vae"]
    );
}

/// `init = { kind = "empty_prompt", position = "bos" }`: every token row is the text
/// encoder's BOS output for "" (diffusers' negative prompt embedding, row 0), in the space the
/// tokens live in; an adapter built without the encoding says what it needs.
#[test]
fn empty_prompt_init_copies_the_bos_row() {
    use softalign_core::adapter::prompt_init::EmptyPromptRows;
    use softalign_core::plugin::AdapterSpec;
    let f = fixtures();
    let _guard = tch::no_grad_guard();
    let sd15 = build(serde_json::json!({"type": "unet", "path": f.root.join("sd15")}));
    let specs: Vec<Box<dyn AdapterSpec>> = vec![serde_json::from_value(serde_json::json!({
        "type": "soft_tokens", "tokens": 3, "sites": ["down"],
        "init": {"kind": "empty_prompt", "position": "bos", "noise_std": 0.0}
    }))
    .unwrap()];
    let err = match specs[0].build(sd15.info(), &BuildContext::cpu(".")) {
        Ok(_) => panic!("built without the encoding"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("empty_prompt"), "{err}");
    let mut ctx = BuildContext::cpu(".");
    ctx.empty_prompt = EmptyPromptRows::compute(sd15.as_ref(), &specs).unwrap();
    let adapter = specs[0].build(sd15.info(), &ctx).unwrap();
    let trainable = adapter.trainable();
    let (_, tokens) = &trainable[0];
    let refs = MappedSafetensors::open(f.root.join("reference.safetensors")).unwrap();
    let bos = refs
        .tensor("sd15.negative_prompt_embeds")
        .unwrap()
        .get(0)
        .get(0);
    let want = bos.view([1, 1, -1]).expand_as(tokens);
    max_err(tokens, &want, "empty-prompt BOS init");

    // SD3: the joint space is after the context_embedder, the context space before it.
    let sd3 = build(serde_json::json!({
        "type": "sd3", "path": f.root.join("sd3"), "t5_max_length": 12
    }));
    for (space, width) in [("joint", 16), ("context", 48)] {
        let specs: Vec<Box<dyn AdapterSpec>> = vec![serde_json::from_value(serde_json::json!({
            "type": "soft_tokens", "tokens": 2, "sites": "joint_blocks[0..1]",
            "token_space": space, "init": {"kind": "empty_prompt"}
        }))
        .unwrap()];
        let mut ctx = BuildContext::cpu(".");
        ctx.empty_prompt = EmptyPromptRows::compute(sd3.as_ref(), &specs).unwrap();
        let a = specs[0].build(sd3.info(), &ctx).unwrap();
        assert_eq!(a.trainable()[0].1.size(), [1, 2, width], "{space}");
    }
}

/// Sampling on a real pipeline: the recipe's `[sampler]` is the default and flags override it
/// (the summary and generation.json say which); guidance must be finite and >= 0 and says when
/// it is off; non-finite latents stop sampling; `--height` alone keeps the native width; a
/// used output folder is refused; eval on a real model needs its prompts; an adapter of
/// another backbone type says so.
#[test]
fn sampling_settings_and_their_checks() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let folder = f.root.join("sd15");
    let model = folder.to_str().unwrap();
    std::fs::write(
        d.join("r.toml"),
        format!(
            "[backbone]\ntype = \"unet\"\npath = \"{model}\"\n\n[sampler]\ntype = \"ddim\"\n\
             steps = 3\ntimestep_spacing = \"trailing\"\n\n[train]\nsteps = 1\nlr = 1e-3\n"
        ),
    )
    .unwrap();
    let base = ["sample", "--quiet", "--prompt", "a red cube", "--n", "1"];
    let run = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        String::from_utf8_lossy(&softalign(&a, d).stderr).into_owned()
    };
    let fails = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        softalign_fails(&a, d)
    };

    let s = run(&["--recipe", "r.toml", "--out", "s1"]);
    assert!(s.contains("DDIM 3 steps (trailing spacing, eta 0)"), "{s}");
    assert!(s.contains("steps: recipe [sampler]"), "{s}");
    assert!(
        s.contains("guidance 7") && s.contains("guidance: default"),
        "{s}"
    );
    assert!(s.contains("1 image of 1 prompt "), "{s}");
    let record = common::read_json(&d.join("s1"), "generation.json");
    assert!(
        record["sampling"]
            .as_str()
            .unwrap()
            .contains("DDIM 3 steps"),
        "{record}"
    );
    assert_eq!(record["seed"], 0);
    let s = run(&["--recipe", "r.toml", "--steps", "2", "--out", "s2"]);
    assert!(s.contains("DDIM 2 steps (trailing spacing"), "{s}");
    assert!(s.contains("steps: command line"), "{s}");

    // The recipe's guidance is the default too; the flag wins; a negative one is refused.
    let with_guidance = |g: &str| {
        std::fs::read_to_string(d.join("r.toml"))
            .unwrap()
            .replace("steps = 3\n", &format!("steps = 3\nguidance = {g}\n"))
    };
    std::fs::write(d.join("g.toml"), with_guidance("5.5")).unwrap();
    let s = run(&["--recipe", "g.toml", "--steps", "1", "--out", "g1"]);
    assert!(
        s.contains("guidance 5.5") && s.contains("guidance: recipe [sampler]"),
        "{s}"
    );
    let s = run(&[
        "--recipe",
        "g.toml",
        "--steps",
        "1",
        "--guidance",
        "2",
        "--out",
        "g2",
    ]);
    assert!(
        s.contains("guidance 2") && s.contains("guidance: command line"),
        "{s}"
    );
    std::fs::write(d.join("bad.toml"), with_guidance("-1.0")).unwrap();
    let e = fails(&["--recipe", "bad.toml", "--out", "g3"]);
    assert!(e.contains("`guidance` must be a finite number >= 0"), "{e}");

    // The folder of an earlier sample is not mixed into.
    let e = fails(&["--recipe", "r.toml", "--out", "s1"]);
    assert!(e.contains("already holds files"), "{e}");

    // One side given: the other is the model's native one (16 px here).
    run(&[
        "--model", model, "--steps", "1", "--height", "24", "--out", "s3",
    ]);
    let img = image::open(d.join("s3/0000-00.png")).unwrap();
    assert_eq!((img.width(), img.height()), (16, 24));
    // `--unet` swaps the folder's UNet for another folder's (Diffusion-DPO's release form):
    // its own unet/ folder gives the same image bit for bit; other backbones refuse it.
    let unet = folder.join("unet");
    run(&[
        "--model",
        model,
        "--steps",
        "1",
        "--height",
        "24",
        "--unet",
        unet.to_str().unwrap(),
        "--out",
        "s3u",
    ]);
    let same = image::open(d.join("s3u/0000-00.png")).unwrap();
    assert_eq!(img.to_rgb8().into_raw(), same.to_rgb8().into_raw());
    let shapes = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/shapes-unet");
    let e = fails(&[
        "--model",
        shapes.to_str().unwrap(),
        "--unet",
        unet.to_str().unwrap(),
        "--out",
        "s3s",
    ]);
    assert!(
        e.contains("--unet replaces the UNet of an SD1.5 / SDXL folder"),
        "{e}"
    );

    for g in ["-1", "nan", "inf"] {
        let flag = format!("--guidance={g}");
        let e = fails(&["--model", model, &flag, "--out", "g"]);
        assert!(e.contains("finite number >= 0"), "--guidance {g}: {e}");
    }
    let s = run(&[
        "--model",
        model,
        "--steps",
        "1",
        "--guidance",
        "0",
        "--out",
        "s4",
    ]);
    assert!(s.contains("guidance off"), "{s}");
    let e = fails(&[
        "--model",
        model,
        "--steps",
        "3",
        "--guidance",
        "1e30",
        "--out",
        "s5",
    ]);
    assert!(e.contains("not finite after sampling step"), "{e}");

    let e = softalign_fails(
        &[
            "eval", "--quiet", "--model", model, "--n", "1", "--out", "e",
        ],
        d,
    );
    assert!(e.contains("--geneval"), "{e}");

    // An adapter trained for SD3 on a UNet: named as such, not as a site mismatch.
    let sd3 = build(serde_json::json!({
        "type": "sd3", "path": f.root.join("sd3"), "t5_max_length": 12
    }));
    let spec: Box<dyn softalign_core::plugin::AdapterSpec> =
        serde_json::from_value(serde_json::json!({
            "type": "soft_tokens", "tokens": 2, "sites": "joint_blocks[0..1]"
        }))
        .unwrap();
    let adapter = spec.build(sd3.info(), &BuildContext::cpu(".")).unwrap();
    let file = d.join("sd3-tokens.safetensors");
    softalign_core::adapter::save_adapter(&file, adapter.as_ref(), &Default::default()).unwrap();
    let e = fails(&[
        "--model",
        model,
        "--adapter",
        file.to_str().unwrap(),
        "--out",
        "s6",
    ]);
    assert!(e.contains("trained for a `sd3` backbone"), "{e}");
}

/// The shipped SD1.5 recipe (init from the empty prompt, no embedding file) trains on a tiny
/// pipeline; without a terminal the trainer prints plain progress lines; resuming a finished
/// run says there is nothing to train; `cache` does not check the adapter it never builds.
#[test]
fn shipped_sd15_recipe_trains_on_a_tiny_pipeline() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    manifest(d);
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("recipes/sd15-softrepa.toml");
    let folder = f.root.join("sd15");
    let sets = [
        format!("backbone.path={}", folder.display()),
        "backbone.dtype=\"f32\"".into(),
        "data.type=\"image_manifest\"".into(),
        "data.path=\"data/train.jsonl\"".into(),
        "data.resolution=16".into(),
        "train.steps=2".into(),
    ];
    let mut args: Vec<String> = vec!["train".into(), "--recipe".into()];
    args.push(shipped.display().to_string());
    args.extend(["--run-dir".into(), "run".into()]);
    for s in &sets {
        args.extend(["--set".into(), s.clone()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(&argv)
        .env("SOFTALIGN_PROGRESS_SECONDS", "0")
        .current_dir(d)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("step 2/2 loss "), "{stderr}");
    assert!(d.join("run/final/adapter.safetensors").is_file());
    let recorded = common::read_json(&d.join("run"), "recipe.json");
    assert_eq!(
        recorded["data"]["path"],
        d.join("data/train.jsonl").to_string_lossy().as_ref(),
        "paths are stored absolute"
    );

    let mut again = argv.clone();
    again.extend(["--resume", "latest", "--quiet"]);
    let out = softalign(&again, d);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nothing to train"), "{stderr}");

    // `cache` builds no adapter: one whose sites fit nothing does not stop it.
    let backbone = format!("type = \"unet\"\npath = \"{}\"", folder.display());
    std::fs::write(d.join("c.toml"), recipe(&backbone, "\"no_such_site\"")).unwrap();
    let out = softalign(&["cache", "--quiet", "--recipe", "c.toml"], d);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cached 4 samples"));
}

/// A backbone `path` / `--model` may be a Hugging Face hub id, found offline in the local hub
/// cache (`models--org--name/snapshots/<refs/main>`); when it is not there, the error says
/// where it looked.
#[test]
fn hub_ids_resolve_from_the_local_cache() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("hub/models--tiny-org--sd15");
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::os::unix::fs::symlink(f.root.join("sd15"), repo.join("snapshots/c0ffee")).unwrap();
    std::fs::write(repo.join("refs/main"), "c0ffee").unwrap();
    std::fs::write(
        d.join("r.toml"),
        "[backbone]\ntype = \"unet\"\npath = \"tiny-org/sd15\"\n[train]\nsteps = 1\nlr = 1e-3\n",
    )
    .unwrap();
    let run = |args: &[&str], cache: &Path| {
        Command::new(env!("CARGO_BIN_EXE_softalign"))
            .args(args)
            .env("HF_HUB_CACHE", cache)
            .current_dir(d)
            .output()
            .unwrap()
    };
    let out = run(&["recipe", "check", "r.toml"], &d.join("hub"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("preset"), "{stderr}");
    let args = [
        "sample",
        "--quiet",
        "--model",
        "tiny-org/sd15",
        "--prompt",
        "a cube",
        "--n",
        "1",
        "--steps",
        "1",
        "--out",
        "s",
    ];
    let out = run(&args, &d.join("hub"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.join("s/0000-00.png").is_file());
    let mut args = args.to_vec();
    *args.last_mut().unwrap() = "s2";
    let out = run(&args, &d.join("empty-hub"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("models--tiny-org--sd15") && stderr.contains("never downloads"),
        "{stderr}"
    );
}

/// `softalign edit` on the tiny SD3 pipeline against `tests/python/flowedit_reference.py`
/// (FlowEdit's loop written from the algorithm, standard CFG, soft tokens injected as
/// SoftREPA's Algorithm 1 in all four branches): the encoded source and the edited latents
/// agree to 1e-5 with n_min = 0 and n_min > 0, with and without tokens, n_avg 1 and 2. A
/// jobs file gives the same latents batched or one by one (seeds follow the edit, not the
/// batch).
#[test]
fn flowedit_matches_the_python_reference() {
    use softalign_core::plugin::AdapterSpec;
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let folder = f.root.join("sd3");
    let img = image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([
            (x * 15) as u8,
            (y * 15) as u8,
            if (x / 4 + y / 4) % 2 == 0 { 220 } else { 30 },
        ])
    });
    img.save(d.join("src.png")).unwrap();

    // Soft tokens large enough to move the output, in the joint space of both blocks.
    let sd3 = build(serde_json::json!({"type": "sd3", "path": folder}));
    let spec: Box<dyn AdapterSpec> = serde_json::from_value(serde_json::json!({
        "type": "soft_tokens", "tokens": 2, "sites": "joint_blocks[0..2]", "token_space": "joint",
        "time_buckets": 100
    }))
    .unwrap();
    let mut adapter = spec.build(sd3.info(), &BuildContext::cpu(".")).unwrap();
    tch::manual_seed(5);
    let state = std::collections::BTreeMap::from([
        (
            "default.tokens".to_string(),
            Tensor::randn([2, 2, 16], (Kind::Float, Device::Cpu)) * 0.5,
        ),
        (
            "time_table".to_string(),
            Tensor::randn([100, 32], (Kind::Float, Device::Cpu)) * 0.5,
        ),
    ]);
    adapter.load_state(&state).unwrap();
    let tokens = d.join("tokens.safetensors");
    softalign_core::adapter::save_adapter(&tokens, adapter.as_ref(), &Default::default()).unwrap();

    let (source, target) = ("a photo of a red cube", "a photo of a blue sphere");
    // name: (n_min, n_avg, seed, tokens)
    let cases = [
        ("plain", 0, 1, 42, false),
        ("tail", 2, 2, 7, false),
        ("tokens", 0, 1, 42, true),
        ("tokens_tail", 2, 2, 7, true),
    ];
    let mut spec_cases = serde_json::Map::new();
    for (name, n_min, n_avg, seed, with_tokens) in cases {
        let (n_min, n_avg, seed) = (n_min.to_string(), n_avg.to_string(), seed.to_string());
        let mut args = vec![
            "edit",
            "--quiet",
            "--model",
            folder.to_str().unwrap(),
            "--image",
            "src.png",
            "--source",
            source,
            "--target",
            target,
            "--steps",
            "8",
            "--n-max",
            "6",
            "--n-min",
            &n_min,
            "--n-avg",
            &n_avg,
            "--seed",
            &seed,
            "--save-latents",
            "--out",
            name,
        ];
        if with_tokens {
            args.extend(["--adapter", tokens.to_str().unwrap()]);
        }
        softalign(&args, d);
        assert!(d.join(name).join("0000.png").is_file());
        spec_cases.insert(
            name.into(),
            serde_json::json!({
                "steps": 8, "n_max": 6, "n_min": n_min.parse::<u64>().unwrap(),
                "n_avg": n_avg.parse::<u64>().unwrap(), "src_guidance": 3.5,
                "tar_guidance": 13.5, "seed": seed.parse::<u64>().unwrap(),
                "adapter": with_tokens.then(|| tokens.clone()),
            }),
        );
    }
    std::fs::write(
        d.join("cases.json"),
        serde_json::json!({
            "model": folder, "image": d.join("src.png"), "source": source, "target": target,
            "cases": spec_cases,
        })
        .to_string(),
    )
    .unwrap();
    common::run_python("flowedit_reference.py", d);
    let refs = MappedSafetensors::open(d.join("reference.safetensors"))
        .unwrap()
        .all()
        .unwrap();
    let ours = |name: &str| {
        MappedSafetensors::open(d.join(name).join("latents.safetensors"))
            .unwrap()
            .all()
            .unwrap()
    };
    let mut edited = Vec::new();
    for (name, ..) in cases {
        let got = ours(name);
        for what in ["x_src", "edited"] {
            let g = got[&format!("{what}.0")].unsqueeze(0);
            let want = &refs[&format!("{name}.{what}")];
            let e = (&g - want).abs().max().double_value(&[]);
            eprintln!("flowedit `{name}` {what}: max |err| {e:.3e}");
            assert!(e <= 1e-5, "{name} {what}: max |err| {e}");
        }
        edited.push(got["edited.0"].shallow_clone());
    }
    // The comparisons mean something: the edit moves the source, and the tokens move the edit.
    // On this tiny random transformer (weights of std 0.05, nearly uniform attention) the
    // tokens move the result only about 6e-5 (the Python reference, token scale 0.5 or 3
    // alike: the blocks' layer norms undo the scale), six times the tolerance, so an edit
    // that dropped the tokens from its forwards would still fail.
    let x_src = &ours("plain")["x_src.0"];
    let diff = |a: usize, b: &Tensor| (&edited[a] - b).abs().max().double_value(&[]);
    let moved = diff(0, x_src);
    let tokens_edit = diff(2, &edited[0]);
    let tokens_tail = diff(3, &edited[1]);
    eprintln!(
        "flowedit: edit moves the source by {moved:.3e}; tokens move the edit by \
         {tokens_edit:.3e}, the tail by {tokens_tail:.3e}"
    );
    assert!(
        moved > 1e-2,
        "the edit leaves the source as it was: {moved}"
    );
    assert!(
        tokens_edit > 2e-5,
        "tokens do not reach the edit: {tokens_edit}"
    );
    assert!(
        tokens_tail > 2e-5,
        "tokens do not reach the tail: {tokens_tail}"
    );

    // A jobs file, batched and one at a time.
    std::fs::write(
        d.join("jobs.jsonl"),
        format!(
            "{{\"image\": \"src.png\", \"source_prompt\": \"{source}\", \"target_prompt\": \"{target}\"}}\n\
             {{\"image\": \"src.png\", \"source_prompt\": \"{source}\", \"target_prompt\": \"a photo of two green spheres\"}}\n"
        ),
    )
    .unwrap();
    for batch in ["2", "1"] {
        let out = format!("jobs{batch}");
        softalign(
            &[
                "edit",
                "--quiet",
                "--model",
                folder.to_str().unwrap(),
                "--jobs",
                "jobs.jsonl",
                "--steps",
                "8",
                "--n-max",
                "6",
                "--batch",
                batch,
                "--save-latents",
                "--out",
                &out,
            ],
            d,
        );
        for f in [
            "0000.png",
            "0001.png",
            "grid.png",
            "edits.jsonl",
            "edit.json",
        ] {
            assert!(d.join(&out).join(f).is_file(), "{out}/{f}");
        }
    }
    let (a, b) = (ours("jobs2"), ours("jobs1"));
    for j in ["edited.0", "edited.1"] {
        let e = (&a[j] - &b[j]).abs().max().double_value(&[]);
        assert!(e <= 1e-5, "{j}: batched and unbatched differ by {e}");
    }
    let e = (&a["edited.0"] - &edited[0]).abs().max().double_value(&[]);
    assert!(
        e <= 1e-5,
        "job 0 of the file differs from the single edit by {e}"
    );

    // Settings FlowEdit cannot run are refused, naming the flag.
    let err = softalign_fails(
        &[
            "edit",
            "--model",
            folder.to_str().unwrap(),
            "--image",
            "src.png",
            "--source",
            source,
            "--target",
            target,
            "--n-max",
            "60",
            "--out",
            "bad",
        ],
        d,
    );
    assert!(err.contains("--n-max 60"), "{err}");
}
