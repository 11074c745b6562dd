//! The `yolov8` detector: an ultralytics YOLOv8 TorchScript export
//! (`YOLO(...).export(format="torchscript")`, engine/exporter.py export_torchscript) run with
//! tch's `CModule`. The module takes RGB in [0, 1] at the export size (anchors and strides are
//! baked in at trace time) and returns [B, 4 + nc, A] (nn/modules/head.py Detect._inference):
//! cx, cy, w, h in input pixels, then sigmoided class scores. The class names and input size
//! come from the archive's `extra/config.txt`, the JSON metadata the exporter writes.
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use softalign_core::detector::Detector;
use softalign_core::plugin::{BuildContext, DetectorSpec};
use softalign_core::{register_plugin, Error, Result};
use tch::{CModule, Device, Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Yolov8Spec {
    /// The `.torchscript` file (relative paths resolve against the recipe).
    pub file: PathBuf,
}

register_plugin!(
    YOLOV8_ENTRY,
    Detector,
    "yolov8",
    "An ultralytics YOLOv8 TorchScript export (raw [B, 4+nc, A] output, names from config.txt)",
    r#"[detector]
type = "yolov8"
file = "yolov8n.torchscript"
"#
);

#[typetag::serde(name = "yolov8")]
impl DetectorSpec for Yolov8Spec {
    /// A missing file named like ultralytics' released exports (`yolov8n.torchscript`, ...)
    /// is a note, as a missing released model folder is: recipes that ship name the file the
    /// user exports; `train` still needs it.
    fn check_files(&self, ctx: &BuildContext) -> Result<()> {
        let path = ctx.resolve(&self.file);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !path.exists() && name.starts_with("yolov8") && name.ends_with(".torchscript") {
            eprintln!(
                "note: detector {} not found; export it with `yolo export model={} \
                 format=torchscript` (ultralytics); `train` needs it",
                path.display(),
                name.replace(".torchscript", ".pt")
            );
            return Ok(());
        }
        read_metadata(&path).map(|_| ())
    }
    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Detector>> {
        Ok(Box::new(Yolov8::load(
            &ctx.resolve(&self.file),
            ctx.device,
        )?))
    }
}

/// What the exporter's `config.txt` says that the detector needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportMetadata {
    pub names: Vec<String>,
    /// (height, width).
    pub imgsz: (i64, i64),
}

/// `extra/config.txt` of a TorchScript archive (a zip whose entries sit under one folder).
pub fn read_metadata(path: &Path) -> Result<ExportMetadata> {
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| Error::file(path, format!("not a TorchScript archive: {e}")))?;
    let name = zip
        .file_names()
        .find(|n| n.ends_with("extra/config.txt"))
        .map(str::to_string)
        .ok_or_else(|| {
            Error::file(
                path,
                "no extra/config.txt: not an ultralytics export (YOLO(...).export(format=\
                 \"torchscript\") writes the class names there)",
            )
        })?;
    let mut text = String::new();
    zip.by_name(&name)
        .map_err(|e| Error::file(path, e))?
        .read_to_string(&mut text)
        .map_err(|e| Error::file(path, format!("{name}: {e}")))?;
    parse_metadata(&text).map_err(|m| Error::file(path, format!("{name}: {m}")))
}

fn parse_metadata(text: &str) -> std::result::Result<ExportMetadata, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let names = v
        .get("names")
        .and_then(|n| n.as_object())
        .ok_or("no `names` object")?;
    let mut out = vec![None; names.len()];
    for (k, n) in names {
        let i: usize = k
            .parse()
            .map_err(|_| format!("`names` key `{k}` is not a class index"))?;
        let slot = out
            .get_mut(i)
            .ok_or(format!("`names` key {i} past the {} classes", names.len()))?;
        *slot = Some(
            n.as_str()
                .ok_or(format!("`names.{k}` is not a string"))?
                .to_string(),
        );
    }
    let names: Vec<String> = out.into_iter().map(Option::unwrap_or_default).collect();
    if names.is_empty() {
        return Err("`names` is empty".into());
    }
    let imgsz: Vec<i64> = v
        .get("imgsz")
        .and_then(|s| s.as_array())
        .ok_or("no `imgsz` list")?
        .iter()
        .map(|x| x.as_i64().filter(|x| *x > 0))
        .collect::<Option<_>>()
        .ok_or("`imgsz` holds no positive integers")?;
    let imgsz = match imgsz[..] {
        [s] => (s, s),
        [h, w] => (h, w),
        _ => return Err(format!("`imgsz` {imgsz:?}: expected [h, w]")),
    };
    Ok(ExportMetadata { names, imgsz })
}

pub struct Yolov8 {
    module: CModule,
    meta: ExportMetadata,
    device: Device,
    file: PathBuf,
}

impl Yolov8 {
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let meta = read_metadata(path)?;
        let mut module = CModule::load_on_device(path, device)
            .map_err(|e| Error::file(path, format!("loading TorchScript: {e}")))?;
        module.set_eval();
        Ok(Self {
            module,
            meta,
            device,
            file: path.to_path_buf(),
        })
    }
}

impl Detector for Yolov8 {
    fn class_names(&self) -> &[String] {
        &self.meta.names
    }
    fn input_size(&self) -> (i64, i64) {
        self.meta.imgsz
    }
    fn device(&self) -> Device {
        self.device
    }
    fn describe(&self) -> String {
        format!(
            "yolov8 {} ({} classes, input {}x{})",
            self.file.display(),
            self.meta.names.len(),
            self.meta.imgsz.0,
            self.meta.imgsz.1
        )
    }
    fn forward_raw(&self, images: &Tensor) -> Result<Tensor> {
        let s = images.size();
        let (h, w) = self.meta.imgsz;
        if s.len() != 4 || s[1] != 3 || s[2] != h || s[3] != w {
            return Err(Error::tensor(
                "images",
                format!(
                    "shape {s:?}: {} was exported for (B, 3, {h}, {w}) (letterbox first)",
                    self.file.display()
                ),
            ));
        }
        let x = images.to_device(self.device).to_kind(Kind::Float);
        self.module
            .forward_ts(&[x])
            .map_err(|e| Error::file(&self.file, format!("forward: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_metadata;

    #[test]
    fn metadata_names_and_size() {
        let m =
            parse_metadata(r#"{"stride": 32, "imgsz": [64, 96], "names": {"1": "b", "0": "a"}}"#)
                .unwrap();
        assert_eq!(m.names, ["a", "b"]);
        assert_eq!(m.imgsz, (64, 96));
        assert!(parse_metadata(r#"{"imgsz": [64], "names": {"3": "a"}}"#)
            .unwrap_err()
            .contains("past the 1 classes"));
        assert!(parse_metadata(r#"{"names": {"0": "a"}}"#)
            .unwrap_err()
            .contains("imgsz"));
    }
}
