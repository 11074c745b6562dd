//! Full diffusers pipeline folders (SD 1.5-, SDXL- and SD3-shaped, tiny random weights built by
//! diffusers): prompt conditioning equal to each pipeline's own `encode_prompt`, and the
//! researcher's path `softalign cache` -> `softalign train` -> `softalign sample` on them.
mod common;

use std::path::Path;
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
