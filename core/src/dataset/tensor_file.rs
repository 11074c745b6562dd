//! A dataset held in one safetensors file: `x0` (N, C, H, W) latents or images, and the caption
//! conditioning named as the backbone's forward arguments, each (N, ...). The simplest way to
//! train on pre-encoded data, and what tests and the `loss` dry run use.
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::backbone::Conditioning;
use crate::dataset::{Batch, Dataset};
use crate::plugin::{BuildContext, DatasetSpec};
use crate::tensors::MappedSafetensors;
use crate::{register_plugin, Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorFileSpec {
    pub path: PathBuf,
    /// Name of the image/latent tensor.
    #[serde(default = "default_x0")]
    pub x0: String,
}

fn default_x0() -> String {
    "x0".into()
}

register_plugin!(
    TENSOR_FILE_ENTRY,
    Dataset,
    "tensor_file",
    "Pre-encoded samples in one safetensors file: x0 (N,C,H,W) + conditioning tensors (N,...)",
    r#"[data]
type = "tensor_file"
path = "data/train.safetensors"
"#
);

#[typetag::serde(name = "tensor_file")]
impl DatasetSpec for TensorFileSpec {
    fn validate(&self, ctx: &BuildContext) -> Result<()> {
        let path = ctx.resolve(&self.path);
        if !path.is_file() {
            return Err(Error::file(&path, "data file not found"));
        }
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Dataset>> {
        Ok(Box::new(TensorFile::open(
            &ctx.resolve(&self.path),
            &self.x0,
        )?))
    }
}

pub struct TensorFile {
    x0: Tensor,
    cond: BTreeMap<String, Tensor>,
}

impl TensorFile {
    pub fn open(path: &std::path::Path, x0_name: &str) -> Result<Self> {
        let file = MappedSafetensors::open(path)?;
        let mut all = file.all()?;
        let x0 = all.remove(x0_name).ok_or_else(|| {
            Error::file(
                path,
                format!("no tensor `{x0_name}` (have: {})", file.names().join(", ")),
            )
        })?;
        if x0.dim() != 4 {
            return Err(Error::file(
                path,
                format!("`{x0_name}` must be (N, C, H, W), got {:?}", x0.size()),
            ));
        }
        let n = x0.size()[0];
        if n == 0 {
            return Err(Error::file(path, format!("`{x0_name}` holds no samples")));
        }
        for (name, t) in &all {
            if t.size().first() != Some(&n) {
                return Err(Error::file(
                    path,
                    format!(
                        "`{name}` has {:?} rows, `{x0_name}` has {n}",
                        t.size().first()
                    ),
                ));
            }
        }
        Ok(Self {
            x0: x0.to_kind(Kind::Float),
            cond: all,
        })
    }
}

impl Dataset for TensorFile {
    fn len(&self) -> usize {
        self.x0.size()[0] as usize
    }

    fn batch(&self, indices: &[usize], device: Device) -> Result<Batch> {
        let n = self.len();
        if let Some(bad) = indices.iter().find(|&&i| i >= n) {
            return Err(Error::invalid(format!(
                "sample index {bad} out of range ({n} samples)"
            )));
        }
        let idx = Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let cond = Conditioning(
            self.cond
                .iter()
                .map(|(k, v)| (k.clone(), v.index_select(0, &idx).to_device(device)))
                .collect(),
        );
        Ok(Batch::encoded(
            self.x0.index_select(0, &idx).to_device(device),
            cond,
        ))
    }
}
