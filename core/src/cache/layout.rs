//! The on-disk layout of an encoding cache: `manifest.json` (what made it, the record layout),
//! `records.bin` (fixed-size records, one per sample, read memory-mapped), `progress.json`
//! (how many records are complete: an interrupted run resumes there) and `empty.safetensors`
//! (the empty caption's encoding, for caption dropout).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::{Error, Result};

pub const FORMAT: &str = "softalign-cache/1";
pub const MANIFEST: &str = "manifest.json";
pub const RECORDS: &str = "records.bin";
pub const PROGRESS: &str = "progress.json";
pub const EMPTY: &str = "empty.safetensors";

/// Per-record bookkeeping fields.
pub const VALID: &str = "valid";
pub const CAPTION_COUNT: &str = "caption_count";
pub const X0_MEAN: &str = "x0.mean";
pub const X0_STD: &str = "x0.std";
/// Conditioning tensors are stored as `cond.<name>` with the captions on the first axis.
pub const COND_PREFIX: &str = "cond.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredDType {
    Bf16,
    F32,
    I64,
    U8,
}

impl StoredDType {
    pub fn kind(self) -> Kind {
        match self {
            Self::Bf16 => Kind::BFloat16,
            Self::F32 => Kind::Float,
            Self::I64 => Kind::Int64,
            Self::U8 => Kind::Uint8,
        }
    }

    pub fn size(self) -> usize {
        self.kind().elt_size_in_bytes()
    }

    /// Floats go to the cache's float type; integers (token ids) keep 64 bits.
    pub fn for_tensor(t: &Tensor, float: StoredDType) -> Self {
        if t.is_floating_point() {
            float
        } else {
            Self::I64
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    pub name: String,
    pub dtype: StoredDType,
    /// Per record (no sample axis).
    pub shape: Vec<i64>,
    /// Byte offset inside a record.
    pub offset: usize,
}

impl Field {
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<i64>() as usize * self.dtype.size()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// The backbone's `encoder_fingerprint`: a cache is refused by a backbone that encodes
    /// differently.
    pub fingerprint: serde_json::Value,
    /// The raw dataset's spec as the recipe gave it, and a digest of its sample list.
    pub source: serde_json::Value,
    pub source_sha256: String,
    pub samples: usize,
    pub captions_per_sample: usize,
    pub float_dtype: StoredDType,
    /// Conditioning stored in the backbone's compact form (`Backbone::compact_conditioning`).
    #[serde(default)]
    pub compact: bool,
    pub record_bytes: usize,
    pub fields: Vec<Field>,
    /// The softalign version that wrote it (informational).
    pub written_by: String,
}

impl Manifest {
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(MANIFEST);
        let m: Manifest = crate::json_file::from_value(crate::json_file::read_value(&p)?)
            .map_err(|e| Error::file(&p, format!("not an encoding-cache manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(Error::file(
                &p,
                format!("format `{}`, this softalign reads `{FORMAT}`", m.format),
            ));
        }
        let mut end = 0;
        for f in &m.fields {
            if f.offset != end {
                return Err(Error::file(
                    &p,
                    format!("field `{}` at offset {}, expected {end}", f.name, f.offset),
                ));
            }
            end += f.bytes();
        }
        if end != m.record_bytes {
            return Err(Error::file(
                &p,
                format!(
                    "fields add up to {end} bytes, record_bytes says {}",
                    m.record_bytes
                ),
            ));
        }
        Ok(m)
    }

    /// Lays `fields` (name, dtype, shape) out back to back.
    pub fn layout(fields: Vec<(String, StoredDType, Vec<i64>)>) -> (Vec<Field>, usize) {
        let mut offset = 0;
        let fields = fields
            .into_iter()
            .map(|(name, dtype, shape)| {
                let f = Field {
                    name,
                    dtype,
                    shape,
                    offset,
                };
                offset += f.bytes();
                f
            })
            .collect();
        (fields, offset)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Written {
    pub records: usize,
}

impl Written {
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join(PROGRESS);
        if !p.exists() {
            return Ok(None);
        }
        crate::json_file::from_value(crate::json_file::read_value(&p)?)
            .map(Some)
            .map_err(|e| Error::file(&p, format!("unreadable progress: {e}")))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_vec(self).expect("progress serialises");
        crate::tensors::write_atomic(&dir.join(PROGRESS), &text)
    }
}

pub fn path(dir: &Path, file: &str) -> PathBuf {
    dir.join(file)
}

/// A human-readable size.
pub fn human_bytes(b: f64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.2} {}", units[u])
}
