//! `softalign detect`: a detector on image files, as ultralytics' predictor would run it
//! (letterbox, raw output, NMS at `--conf` / `--iou`): one JSON line per image with its boxes
//! (in the image's pixels), classes, scores and per-class counts; optionally the letterboxed
//! inputs and raw outputs as a safetensors file, for parity checks.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use softalign_core::detector::{
    detect_raw, hard_counts, non_max_suppression, Detector, NmsOptions,
};
use softalign_core::dtype::DeviceSpec;
use softalign_core::plugin::{BuildContext, DetectorSpec};
use softalign_core::tensors::save_safetensors;
use tch::{Kind, Tensor};

#[derive(clap::Args)]
pub struct Args {
    /// An ultralytics YOLOv8 TorchScript export (`.torchscript`), or a TOML file holding one
    /// `[detector]` table (`type = "yolov8"`, `file = ...`).
    #[arg(long)]
    pub detector: PathBuf,
    /// Image files, or folders whose .png / .jpg / .jpeg files are read (sorted by name).
    #[arg(long, num_args = 1.., required = true)]
    pub images: Vec<PathBuf>,
    /// Where to write one JSON line per image.
    #[arg(long)]
    pub output: PathBuf,
    /// Also write `input` (the letterboxed images, N x 3 x H x W in [0, 1]) and `raw` (the
    /// detector's output, N x (4 + classes) x anchors) to this safetensors file.
    #[arg(long)]
    pub raw: Option<PathBuf>,
    /// Score threshold (ultralytics `conf`).
    #[arg(long, default_value_t = 0.25)]
    pub conf: f64,
    /// NMS IoU threshold (ultralytics `iou`).
    #[arg(long, default_value_t = 0.7)]
    pub iou: f64,
    /// Most detections per image (ultralytics `max_det`).
    #[arg(long, default_value_t = 300)]
    pub max_det: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The detector a file names: a TorchScript export, or a TOML `[detector]` table.
pub fn load_detector(path: &Path, ctx: &BuildContext) -> anyhow::Result<Box<dyn Detector>> {
    if path.extension().is_some_and(|e| e == "toml") {
        #[derive(serde::Deserialize)]
        struct File {
            detector: Box<dyn DetectorSpec>,
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        let f: File = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        // Paths inside a TOML file are relative to that file, as in recipes.
        let ctx = BuildContext {
            recipe_dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            ..ctx.clone()
        };
        return Ok(f.detector.build(&ctx)?);
    }
    // A path given on the command line is relative to the working directory.
    let spec = softalign_backbones::yolov8::Yolov8Spec {
        file: path.to_path_buf(),
    };
    Ok(spec.build(ctx)?)
}

/// The image files `args` name, folders expanded.
fn image_files(args: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in args {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("{}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        ["png", "jpg", "jpeg"].contains(&e.to_lowercase().as_str())
                    })
                })
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("{}: no .png / .jpg / .jpeg files", p.display());
            }
            out.extend(files);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            bail!("{}: no such image file or folder", p.display());
        }
    }
    Ok(out)
}

/// An image file as (1, 3, H, W) RGB in [0, 1].
pub fn read_image(path: &Path) -> anyhow::Result<Tensor> {
    let img = image::open(path)
        .with_context(|| format!("{}: not a readable image", path.display()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    Ok(Tensor::from_slice(img.as_raw())
        .view([h as i64, w as i64, 3])
        .permute([2, 0, 1])
        .unsqueeze(0)
        .to_kind(Kind::Float)
        / 255.0)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let device = DeviceSpec::parse(&a.device)
        .and_then(|d| d.resolve())
        .context("--device")?;
    if !(0.0..1.0).contains(&a.conf) || !(0.0..=1.0).contains(&a.iou) {
        bail!("--conf must be in [0, 1) and --iou in [0, 1]");
    }
    let ctx = BuildContext {
        device,
        ..BuildContext::cpu(".")
    };
    let detector = load_detector(&a.detector, &ctx)
        .with_context(|| format!("--detector {}", a.detector.display()))?;
    let names = detector.class_names().to_vec();
    let files = image_files(&a.images)?;
    eprintln!("{}: {} images", detector.describe(), files.len());
    let opts = NmsOptions {
        conf: a.conf,
        iou: a.iou,
        max_det: a.max_det,
        ..NmsOptions::default()
    };
    let mut out = std::fs::File::create(&a.output)
        .with_context(|| format!("--output {}", a.output.display()))?;
    let (mut inputs, mut raws) = (Vec::new(), Vec::new());
    let _guard = tch::no_grad_guard();
    for f in &files {
        let img = read_image(f)?;
        let (raw, lb) = detect_raw(detector.as_ref(), &img.to_device(device))
            .with_context(|| f.display().to_string())?;
        let kept = non_max_suppression(&raw, &opts)?;
        let counts = hard_counts(&kept, names.len(), a.conf);
        let dets: Vec<serde_json::Value> = kept[0]
            .iter()
            .map(|k| {
                let b = lb.to_image(k.xyxy.map(f64::from));
                serde_json::json!({
                    "class": names[k.class],
                    "class_id": k.class,
                    "score": k.score,
                    "box": b,
                })
            })
            .collect();
        let counts: serde_json::Map<String, serde_json::Value> = counts[0]
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(c, n)| (names[c].clone(), (*n).into()))
            .collect();
        let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        println!(
            "{}: {}",
            f.display(),
            if summary.is_empty() {
                "nothing".to_string()
            } else {
                summary.join(", ")
            }
        );
        let line = serde_json::json!({
            "file": f.display().to_string(),
            "height": lb.from.0,
            "width": lb.from.1,
            "detections": dets,
            "counts": counts,
        });
        writeln!(out, "{line}").with_context(|| a.output.display().to_string())?;
        if a.raw.is_some() {
            inputs.push(lb.apply(&img.to_device(device)));
            raws.push(raw);
        }
    }
    if let Some(p) = &a.raw {
        save_safetensors(
            p,
            &[
                ("input".to_string(), Tensor::cat(&inputs, 0)),
                ("raw".to_string(), Tensor::cat(&raws, 0)),
            ],
            &Default::default(),
        )
        .with_context(|| format!("--raw {}", p.display()))?;
    }
    Ok(())
}
