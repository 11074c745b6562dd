//! Full-parameter `softalign train` on the shapes preset: a few steps on a tiny split write a
//! pipeline folder that loads, whose weights moved from the initial ones, text tower included.
use crate::common::{softalign_train, world_image_manifest};
use softalign_backbones::sd3::{FlowMatch, TimestepSampling};
use softalign_backbones::shapes::{ShapesBackbone, ShapesConfig};
use softalign_core::backbone::Backbone;
use softalign_core::dtype::DType;
use tch::{Device, Tensor};

const RECIPE: &str = r#"
name = "shapes-smoke"
seed = 5

[backbone]
type = "shapes"
preset = "tiny"
timesteps = { kind = "logit_normal" }

[[objective]]
type = "dsm"
weight = 1.0

[data]
type = "shapes"
n = 8
caption_dropout = 0.2

[train]
mode = "full"
steps = 3
images_per_step = 2
per_image_noise = true
per_image_timesteps = true
lr = 1e-3
ema = { decay = 0.5 }
checkpoint = { every = 3, keep = 1 }
"#;

/// The initial weights of a run of `RECIPE`: the same seed, the same preset.
fn run_init(noise: FlowMatch) -> ShapesBackbone {
    softalign_core::train::seed::seed_everything(5);
    ShapesBackbone::random(
        &ShapesConfig::tiny().unwrap(),
        Device::Cpu,
        DType::F32,
        noise,
    )
    .unwrap()
}

#[test]
fn three_full_mode_steps_write_a_loadable_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("smoke.toml");
    std::fs::write(&recipe, RECIPE).unwrap();
    let run = dir.path().join("run");
    let out = softalign_train(&recipe, &run);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    let noise = FlowMatch::new(TimestepSampling::UniformInt, 1.0).unwrap();
    let trained =
        ShapesBackbone::load(&run.join("final"), Device::Cpu, DType::F32, noise.clone()).unwrap();
    ShapesBackbone::load(
        &run.join("final-ema"),
        Device::Cpu,
        DType::F32,
        noise.clone(),
    )
    .unwrap();
    let init = run_init(noise);
    let (a, b) = (
        init.var_store().variables(),
        trained.var_store().variables(),
    );
    let moved = |prefix: &str| {
        a.iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .any(|(n, t)| !t.equal(&b[n]))
    };
    // Three Adam steps at lr 1e-3 move each weight by a few 1e-3 at most: the run started
    // from exactly this init.
    let most = a
        .iter()
        .map(|(n, t)| (t - &b[n]).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(
        most < 0.01,
        "weights moved by up to {most}: not the run's init?"
    );
    assert!(moved("text_encoder."), "the text tower did not train");
    assert!(moved("transformer."), "the MMDiT did not train");

    // `softalign export` writes the last checkpoint exactly as the run wrote its results.
    let export = |extra: &[&str], out: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_softalign"))
            .args(["export", "--run-dir"])
            .arg(&run)
            .args(extra)
            .arg("--out")
            .arg(dir.path().join(out))
            .output()
            .unwrap()
    };
    let weights = "transformer/diffusion_pytorch_model.safetensors";
    for (extra, out, twin) in [
        (&[][..], "raw", "final"),
        (&["--ema"][..], "ema", "final-ema"),
    ] {
        let o = export(extra, out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = std::fs::read(dir.path().join(out).join(weights)).unwrap();
        assert!(
            got == std::fs::read(run.join(twin).join(weights)).unwrap(),
            "{out} vs {twin}"
        );
    }
    let o = export(&["--ema"], "ema");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("already holds files"),
        "{e}"
    );
    let o = export(&["--checkpoint", "nowhere"], "x");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("nowhere"), "{e}");
}

/// `train.frozen` keeps the named backbone weights out of full-mode training: a denoiser
/// trained on a fixed text tower ends with the tower exactly as it started and the MMDiT
/// moved; a glob that names nothing is refused, naming it.
#[test]
fn frozen_weights_stay_as_they_started_while_the_rest_trains() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = RECIPE.replace(
        "mode = \"full\"",
        "mode = \"full\"\nfrozen = [\"text_encoder.*\"]",
    );
    let path = dir.path().join("frozen.toml");
    std::fs::write(&path, &recipe).unwrap();
    let run = dir.path().join("run");
    let out = softalign_train(&path, &run);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let noise = FlowMatch::new(TimestepSampling::UniformInt, 1.0).unwrap();
    let trained =
        ShapesBackbone::load(&run.join("final"), Device::Cpu, DType::F32, noise.clone()).unwrap();
    let init = run_init(noise);
    let (a, b) = (
        init.var_store().variables(),
        trained.var_store().variables(),
    );
    let mut frozen = 0;
    for (n, t) in &a {
        if n.starts_with("text_encoder.") {
            assert!(t.equal(&b[n]), "{n} moved although frozen");
            frozen += 1;
        }
    }
    assert!(frozen > 10, "{frozen}");
    assert!(
        a.iter()
            .filter(|(n, _)| n.starts_with("transformer."))
            .any(|(n, t)| !t.equal(&b[n])),
        "the MMDiT did not train"
    );

    let typo = recipe.replace("[\"text_encoder.*\"]", "[\"text_encoder*x\"]");
    std::fs::write(&path, typo).unwrap();
    let out = softalign_train(&path, &dir.path().join("typo"));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("`text_encoder*x` matches no"),
        "{e}"
    );
}

/// `[backbone] ddpm` re-parameterises a UNet base (v-prediction on a zero-terminal-SNR
/// schedule): the backbone reports the new prediction, trains towards the v target (-x0 at
/// the last timestep), and the folder it saves records both, so it loads back the same; an
/// MMDiT and epsilon at zero SNR are refused.
#[test]
fn a_unet_base_is_reparameterised_to_v_prediction_at_zero_terminal_snr() {
    use softalign_core::backbone::Prediction;
    use softalign_core::plugin::{BackboneSpec, BuildContext};
    let spec = |extra: &str| -> softalign_backbones::shapes::ShapesSpec {
        toml::from_str(&format!("preset = \"unet\"\n{extra}")).unwrap()
    };
    let ctx = BuildContext::cpu(".");
    let b = spec("ddpm = { prediction_type = \"v_prediction\", rescale_betas_zero_snr = true }")
        .build(&ctx)
        .unwrap();
    assert_eq!(b.info().prediction, Prediction::VPrediction);
    let x0 = Tensor::ones([1, 3, 4, 4], (tch::Kind::Float, Device::Cpu));
    let eps = Tensor::zeros([1, 3, 4, 4], (tch::Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[999.0f32]);
    let target = b.noise().target(&x0, &eps, &t);
    assert!(target.equal(&(-&x0)), "v at zero SNR is -x0");
    let dir = tempfile::tempdir().unwrap();
    b.save_pretrained(dir.path()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("scheduler/scheduler_config.json")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(cfg["prediction_type"], "v_prediction");
    assert_eq!(cfg["rescale_betas_zero_snr"], true);
    let noise = FlowMatch::new(TimestepSampling::UniformInt, 1.0).unwrap();
    let back = ShapesBackbone::load(dir.path(), Device::Cpu, DType::F32, noise).unwrap();
    assert_eq!(back.info().prediction, Prediction::VPrediction);
    assert!(back.noise().target(&x0, &eps, &t).equal(&(-&x0)));

    let err = |extra: &str, preset: &str| {
        let s: softalign_backbones::shapes::ShapesSpec =
            toml::from_str(&format!("preset = \"{preset}\"\n{extra}")).unwrap();
        s.build(&ctx).err().expect("refused").to_string()
    };
    let e = err(
        "ddpm = { prediction_type = \"epsilon\", rescale_betas_zero_snr = true }",
        "unet",
    );
    assert!(
        e.contains("needs `prediction_type = \"v_prediction\"`"),
        "{e}"
    );
    let e = err("ddpm = { prediction_type = \"v_prediction\" }", "tiny");
    assert!(e.contains("apply to a UNet base"), "{e}");
}

/// Raw images + captions from an `image_manifest` (PNG files, one of them corrupt) go through
/// the backbone's own encoders (`encode_images`, `encode_prompts`) inside training.
#[test]
fn soft_tokens_train_on_an_image_manifest_and_skip_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    world_image_manifest(dir.path(), 6, 6);
    let recipe = dir.path().join("manifest.toml");
    std::fs::write(
        &recipe,
        r#"
name = "manifest-smoke"
seed = 1

[backbone]
type = "shapes"
preset = "tiny"

[[adapter]]
type = "soft_tokens"
tokens = 2
sites = "joint_blocks[0..2]"
token_space = "joint"

[[objective]]
type = "softrepa_contrastive"
weight = 1.0

[data]
type = "image_manifest"
path = "data/train.jsonl"
resolution = 32

[train]
steps = 4
images_per_step = 7
lr = 1e-2
"#,
    )
    .unwrap();
    let run = dir.path().join("run");
    let out = softalign_train(&recipe, &run);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Seven distinct images are asked for and only six read: the batch cannot be filled, and
    // the run says so, naming the broken file, instead of repeating an image.
    assert!(!out.status.success());
    assert!(stderr.contains("broken.png"), "{stderr}");
    assert!(stderr.contains("no readable image left"), "{stderr}");

    let recipe_text = std::fs::read_to_string(&recipe).unwrap();
    std::fs::write(
        &recipe,
        recipe_text.replace("images_per_step = 7", "images_per_step = 4"),
    )
    .unwrap();
    let run = dir.path().join("run2");
    let out = softalign_train(&recipe, &run);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4, "{metrics}");
    assert!(metrics.contains("softrepa_contrastive"), "{metrics}");
}
