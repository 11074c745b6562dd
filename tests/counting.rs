//! Issue 13: the detector and the counting objective against Python.
//! - a random-weight yolov8n built from yolov8n.yaml and exported offline by ultralytics: the
//!   raw output equals the TorchScript module run in Python, NMS keeps what ultralytics'
//!   `non_max_suppression` keeps; `softalign detect` on PNG files (letterboxed) agrees too;
//! - the counting term on the toy denoiser of objectives_reference.py with a tiny traced
//!   detector: terms and gradients w.r.t. the soft tokens equal the reference (per-image
//!   timesteps, skipped captions, composed with the contrastive loss, chunked or not), and the
//!   gradient matches central finite differences.
// The `yolov8` detector plugin lives there; nothing else names the crate, so force the link.
extern crate softalign_backbones;
mod objectives_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use objectives_common as common;
use softalign_core::adapter::Adapter;
use softalign_core::detector::{non_max_suppression, NmsOptions};
use softalign_core::objective::Objective;
use softalign_core::plugin::{BuildContext, DetectorSpec, ObjectiveSpec};
use softalign_core::tensors::MappedSafetensors;
use softalign_objectives::{evaluate, StepInputs, StepOptions};
use tch::{Device, Kind, Tensor};

/// The reference's files, made once for every test of this binary (ultralytics' import and
/// export dominate its time).
fn fixture() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(common::counting_fixture).path()
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join(name)).unwrap()).unwrap()
}

fn tensors(name: &str) -> BTreeMap<String, Tensor> {
    MappedSafetensors::open(fixture().join(name))
        .unwrap()
        .all()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn yolo() -> Box<dyn softalign_core::detector::Detector> {
    let spec: Box<dyn DetectorSpec> =
        toml::from_str("type = \"yolov8\"\nfile = \"yolov8n.torchscript\"\n").unwrap();
    spec.build(&BuildContext::cpu(fixture())).unwrap()
}

/// Per image: class -> count, from ultralytics' NMS output.
fn counts_of(reference: &serde_json::Value) -> Vec<BTreeMap<usize, u64>> {
    reference
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r["counts"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap()))
                .collect()
        })
        .collect()
}

#[test]
fn yolov8_raw_output_and_nms_match_ultralytics() {
    let det = yolo();
    assert_eq!(det.class_names().len(), 80);
    assert_eq!(det.input_size(), (64, 64));
    let io = tensors("yolo_io.safetensors");
    let raw = det.forward_raw(&io["input"]).unwrap();
    let d = max_diff(&raw, &io["raw"]);
    eprintln!(
        "yolov8n raw output: max |rust - python| = {d:.2e} over {:?}",
        raw.size()
    );
    assert!(d < 1e-4, "raw output differs by {d}");
    let want = json("yolo_nms.json");
    let kept = non_max_suppression(&raw, &NmsOptions::default()).unwrap();
    let counts = counts_of(&want);
    let mut total = 0;
    for (img, k) in kept.iter().enumerate() {
        let mut got: BTreeMap<usize, u64> = BTreeMap::new();
        for d in k {
            *got.entry(d.class).or_default() += 1;
        }
        assert_eq!(got, counts[img], "image {img}: NMS counts per class");
        // The same boxes, in the same (score) order.
        let boxes = want[img]["boxes"].as_array().unwrap();
        for (d, b) in k.iter().zip(boxes) {
            for (x, y) in d.xyxy.iter().zip(b.as_array().unwrap()) {
                assert!((f64::from(*x) - y.as_f64().unwrap()).abs() < 1e-3);
            }
        }
        total += k.len();
    }
    assert!(
        total > 0,
        "the fixture's head biases must leave detections to compare"
    );
    // Wrong input sizes are refused with the size the export takes.
    let err = det
        .forward_raw(&Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("(B, 3, 64, 64)"), "{err}");
}

#[test]
fn detect_cli_letterboxes_and_counts_like_python() {
    let dir = fixture();
    let out = tempfile::tempdir().unwrap();
    let jsonl = out.path().join("results.jsonl");
    let raw = out.path().join("raw.safetensors");
    let files: Vec<PathBuf> = (0..3).map(|k| dir.join(format!("img_{k}.png"))).collect();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_softalign"))
        .arg("detect")
        .arg("--detector")
        .arg(dir.join("yolov8n.torchscript"))
        .arg("--images")
        .args(&files)
        .arg("--output")
        .arg(&jsonl)
        .arg("--raw")
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let got = MappedSafetensors::open(&raw).unwrap().all().unwrap();
    let want = tensors("detect_io.safetensors");
    let di = max_diff(&got["input"], &want["input"]);
    let dr = max_diff(&got["raw"], &want["raw"]);
    eprintln!("detect: letterbox max diff {di:.2e}, raw max diff {dr:.2e}");
    assert!(di < 1e-6 && dr < 1e-4, "input {di}, raw {dr}");
    let counts = counts_of(&json("detect_nms.json"));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (line, want) in lines.iter().zip(&counts) {
        // The yaml-built model's class names are its indices.
        let got: BTreeMap<usize, u64> = line["counts"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap()))
            .collect();
        assert_eq!(&got, want, "{}", line["file"]);
        for d in line["detections"].as_array().unwrap() {
            let b: Vec<f64> = serde_json::from_value(d["box"].clone()).unwrap();
            assert!(b[2] <= line["width"].as_f64().unwrap() && b[1] >= 0.0);
        }
    }
    // A relative --detector is relative to the working directory (it once was resolved
    // against its own folder, as paths inside a TOML [detector] table are).
    let relative = std::process::Command::new(env!("CARGO_BIN_EXE_softalign"))
        .current_dir(dir.parent().unwrap())
        .args(["detect", "--detector"])
        .arg(Path::new(dir.file_name().unwrap()).join("yolov8n.torchscript"))
        .arg("--images")
        .arg(&files[0])
        .arg("--output")
        .arg(out.path().join("relative.jsonl"))
        .output()
        .unwrap();
    assert!(
        relative.status.success(),
        "{}",
        String::from_utf8_lossy(&relative.stderr)
    );
    // A file that is no TorchScript export is named in the error.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(["detect", "--detector"])
        .arg(dir.join("toy.safetensors"))
        .arg("--images")
        .arg(&files[0])
        .arg("--output")
        .arg(&jsonl)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("toy.safetensors"),
        "{err}"
    );
}

fn counting_objectives(case: &str, max_timestep: f64) -> Vec<Box<dyn Objective>> {
    let mut src = format!(
        "[[objective]]\ntype = \"counting\"\nweight = 0.5\nmax_timestep = {max_timestep:?}\n\
         threshold = 0.3\ncandidate_threshold = 0.05\niou = 0.3\ntemperature = 0.1\n\
         detector = {{ type = \"yolov8\", file = \"tiny_detector.torchscript\" }}\n"
    );
    if case == "with_contrastive" {
        src.push_str("[[objective]]\ntype = \"softrepa_contrastive\"\ntemperature = 1.0\n");
    }
    #[derive(serde::Deserialize)]
    struct List {
        objective: Vec<Box<dyn ObjectiveSpec>>,
    }
    let list: List = toml::from_str(&src).unwrap();
    let ctx = BuildContext::cpu(fixture());
    list.objective
        .iter()
        .map(|s| s.build_in(&ctx).unwrap())
        .collect()
}

fn case_inputs(case: &str, captions: &[String]) -> StepInputs {
    let mut t = tensors(&format!("count_case_{case}.safetensors"));
    let mut take = |n: &str| t.remove(n).unwrap();
    let x0 = take("x0");
    let noise = take("noise");
    let timestep = take("timestep");
    let cond = softalign_core::backbone::Conditioning::new()
        .with("encoder_hidden_states", take("encoder_hidden_states"))
        .with("pooled_projections", take("pooled_projections"));
    StepInputs {
        x0,
        cond,
        noise,
        timestep,
        captions: Some(captions.to_vec()),
        preference_pairs: false,
    }
}

#[test]
fn counting_term_matches_python_and_finite_differences() {
    let dir = fixture();
    let expected = json("count_expected.json");
    let ref_grads = tensors("count_grads.safetensors");
    let toy = common::Toy::load(&dir.join("toy.safetensors"), Kind::Float).unwrap();
    let adapters: Vec<Box<dyn Adapter>> =
        vec![common::adapter(Some(&dir.join("adapter.safetensors")))];
    for (case, want) in expected.as_object().unwrap() {
        let captions: Vec<String> = serde_json::from_value(want["captions"].clone()).unwrap();
        let objs = counting_objectives(case, want["max_timestep"].as_f64().unwrap());
        for chunk in [None, Some(1)] {
            for (_, mut p) in adapters[0].trainable() {
                p.zero_grad();
            }
            let opts = StepOptions {
                pairs_per_forward: chunk,
                backward: Some(1.0),
            };
            let got = evaluate(
                &toy,
                Some(&adapters),
                &objs,
                case_inputs(case, &captions),
                &opts,
            )
            .unwrap_or_else(|e| panic!("{case}: {e}"));
            let terms: BTreeMap<String, f64> = got
                .terms
                .iter()
                .cloned()
                .chain([("total".to_string(), got.total)])
                .collect();
            for (name, w) in want["terms"].as_object().unwrap() {
                let (v, w) = (terms[name], w.as_f64().unwrap());
                let d = (v - w).abs();
                assert!(
                    d < 1e-5 * w.abs().max(1.0),
                    "{case} chunk={chunk:?}: {name} = {v}, reference {w}"
                );
            }
            let mut worst: f64 = 0.0;
            for (name, p) in adapters[0].trainable() {
                let r = &ref_grads[&format!("{case}/{name}")];
                let g = p.grad();
                let g = if g.defined() { g } else { r.zeros_like() };
                let d = max_diff(&g, r);
                let scale = r.abs().max().double_value(&[]).max(1.0);
                assert!(
                    d < 1e-5 * scale,
                    "{case} chunk={chunk:?}: grad of {name} differs by {d:e} (scale {scale})"
                );
                worst = worst.max(d / scale);
            }
            eprintln!(
                "{case:18} chunk={chunk:?}: counting {:.6} (reference {}), max rel grad diff {worst:.1e}",
                terms["counting"], want["terms"]["counting"]
            );
        }
    }
    let g = &ref_grads["per_image_t/positive.tokens"];
    assert!(
        g.abs().max().double_value(&[]) > 1e-3,
        "the reference gradient must not vanish"
    );
    finite_differences(&toy, &adapters, &expected["per_image_t"]);
}

/// Central differences of the counting loss along the largest gradient coordinates of the
/// positive tokens (fp32: a relative tolerance of a few percent).
fn finite_differences(toy: &common::Toy, adapters: &[Box<dyn Adapter>], want: &serde_json::Value) {
    let captions: Vec<String> = serde_json::from_value(want["captions"].clone()).unwrap();
    let objs = counting_objectives("per_image_t", want["max_timestep"].as_f64().unwrap());
    let loss = || {
        evaluate(
            toy,
            Some(adapters),
            &objs,
            case_inputs("per_image_t", &captions),
            &StepOptions::default(),
        )
        .unwrap()
        .total
    };
    let (_, tokens) = adapters[0]
        .trainable()
        .into_iter()
        .find(|(n, _)| n == "positive.tokens")
        .unwrap();
    for (_, mut p) in adapters[0].trainable() {
        p.zero_grad();
    }
    evaluate(
        toy,
        Some(adapters),
        &objs,
        case_inputs("per_image_t", &captions),
        &StepOptions {
            pairs_per_forward: None,
            backward: Some(1.0),
        },
    )
    .unwrap();
    let grad = tokens.grad().reshape([-1]);
    let order = grad.abs().argsort(0, true);
    // fp32 losses of about 20 carry ~1e-6 of rounding: a step this size keeps it below 1e-4.
    let h = 1e-2;
    let mut flat = tokens.view([-1]);
    for k in 0..4 {
        let i = order.int64_value(&[k]);
        let g = grad.double_value(&[i]);
        let orig = flat.double_value(&[i]);
        let _guard = tch::no_grad_guard();
        let _ = flat.get(i).fill_(orig + h);
        let up = loss();
        let _ = flat.get(i).fill_(orig - h);
        let down = loss();
        let _ = flat.get(i).fill_(orig);
        let fd = (up - down) / (2.0 * h);
        eprintln!("finite differences: d/d tokens[{i}] autograd {g:.5} central {fd:.5}");
        assert!(
            (fd - g).abs() < 0.05 * g.abs().max(1e-2),
            "tokens[{i}]: autograd {g}, finite differences {fd}"
        );
    }
    let _ = &mut flat;
}

/// The shipped shapes detector (assets/shapes-detector) on held-out renders (a seed its
/// training data never used), at the shapes counting recipes' settings (conf 0.1, IoU 0.3).
/// Issue 13 asks for 98% per class; the shipped detector measured 96.3-99.3% (its NOTE.md),
/// so this is a breakage floor until a longer-trained detector replaces it.
#[test]
fn shapes_detector_counts_held_out_renders() {
    use softalign_worlds::shapes::{train_example, SceneConfig, Shape};
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("assets/shapes-detector/shapes-detector.torchscript");
    let det = softalign_backbones::yolov8::Yolov8::load(&file, Device::Cpu).unwrap();
    let names: Vec<&str> = Shape::ALL.iter().map(|s| s.name()).collect();
    assert_eq!(softalign_core::detector::Detector::class_names(&det), names);
    let cfg = SceneConfig::default();
    let n = 400;
    let mut pixels = Vec::new();
    let mut truth = Vec::new();
    for i in 0..n {
        let ex = train_example(i, 987_654, &cfg).unwrap();
        let raw = ex.image.as_raw();
        for c in 0..3 {
            pixels.extend(raw.iter().skip(c).step_by(3).map(|&v| f32::from(v) / 255.0));
        }
        let mut t = vec![0u32; names.len()];
        for o in &ex.scene.objects {
            t[Shape::ALL.iter().position(|s| *s == o.shape).unwrap()] += 1;
        }
        truth.push(t);
    }
    let images = Tensor::from_slice(&pixels).view([n as i64, 3, 32, 32]);
    let raw = {
        let _guard = tch::no_grad_guard();
        softalign_core::detector::detect_raw(&det, &images)
            .unwrap()
            .0
    };
    let opts = NmsOptions {
        conf: 0.1,
        iou: 0.3,
        ..NmsOptions::default()
    };
    let kept = non_max_suppression(&raw, &opts).unwrap();
    let counts = softalign_core::detector::hard_counts(&kept, names.len(), 0.1);
    for (c, name) in names.iter().enumerate() {
        let right = counts
            .iter()
            .zip(&truth)
            .filter(|(g, t)| g[c] == t[c])
            .count();
        let acc = right as f64 / n as f64;
        eprintln!(
            "shapes detector, held-out renders: {name} count accuracy {acc:.4} ({right}/{n})"
        );
        assert!(
            acc >= 0.98,
            "{name}: {acc} (issue 13 asks 98 % for every class)"
        );
    }
}

/// `softalign bench --recipe` times the shapes counting recipe's step and each term alone.
#[test]
fn bench_recipe_times_each_objective() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(["bench", "--recipe"])
        .arg(root.join("recipes/shapes/softrepa-counting.toml"))
        .args([
            "--set",
            "train.images_per_step=2",
            "--set",
            "objective.2.max_timestep=1000",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for case in [
        "all objectives",
        "softrepa_contrastive alone",
        "dsm alone",
        "counting alone",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(case))
            .unwrap_or_else(|| panic!("no `{case}` row in\n{text}"));
        let cols: Vec<f64> = line[case.len()..]
            .split_whitespace()
            .map(|c| c.parse().unwrap())
            .collect();
        // ms/step, forwards, gradient norm, loss
        assert_eq!(cols.len(), 4, "{line}");
        assert!(cols[0] > 0.0, "{line}");
        if case == "all objectives" {
            assert!(
                cols[2] > 0.0 && cols[2].is_finite(),
                "gradient norm: {line}"
            );
        }
    }
}
