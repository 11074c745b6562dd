//! Training from an encoding cache: records read memory-mapped, a random caption of each
//! sample's cached ones per access, latents drawn from the cached posterior.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use tch::{Device, Kind, Tensor};

use super::layout::*;
use crate::backbone::Conditioning;
use crate::dataset::{Batch, Dataset};
use crate::tensors::MappedSafetensors;
use crate::{Error, Result};

pub struct EncodedCache {
    dir: PathBuf,
    manifest: Manifest,
    records: Mmap,
    /// Records whose image was readable when the cache was made.
    valid: Vec<usize>,
    empty: BTreeMap<String, Tensor>,
    caption_dropout: f64,
}

impl EncodedCache {
    pub fn open(dir: &Path, caption_dropout: f64) -> Result<Self> {
        if !dir.join(MANIFEST).is_file() {
            return Err(Error::file(
                dir,
                "no encoding cache here: run `softalign cache --recipe <this recipe>` first",
            ));
        }
        let manifest = Manifest::read(dir)?;
        let done = Written::read(dir)?.map(|p| p.records).unwrap_or(0);
        if done < manifest.samples {
            return Err(Error::file(
                dir,
                format!(
                    "the encoding cache is incomplete ({done} of {} samples); rerun \
                     `softalign cache` to finish it",
                    manifest.samples
                ),
            ));
        }
        let path = dir.join(RECORDS);
        let f = std::fs::File::open(&path).map_err(|e| Error::file(&path, e))?;
        // SAFETY: the cache is written once and only appended to by `softalign cache`, which
        // refuses to run on a complete cache's settings changing; we only read.
        let records = unsafe { Mmap::map(&f) }.map_err(|e| Error::file(&path, e))?;
        let want = manifest.record_bytes * manifest.samples;
        if records.len() < want {
            return Err(Error::file(
                &path,
                format!("{} bytes, the manifest needs {want}", records.len()),
            ));
        }
        let vf = manifest
            .field(VALID)
            .ok_or_else(|| Error::file(dir.join(MANIFEST), "no `valid` field"))?
            .clone();
        let valid: Vec<usize> = (0..manifest.samples)
            .filter(|&i| records[i * manifest.record_bytes + vf.offset] == 1)
            .collect();
        if valid.is_empty() {
            return Err(Error::file(
                dir,
                "the encoding cache holds no readable sample",
            ));
        }
        let empty = MappedSafetensors::open(dir.join(EMPTY))?.all()?;
        if !(0.0..1.0).contains(&caption_dropout) {
            return Err(Error::Recipe(format!(
                "data encoded_cache: `caption_dropout` must be in [0, 1), got {caption_dropout}"
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            records,
            valid,
            empty,
            caption_dropout,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn bytes(&self, record: usize, f: &Field) -> &[u8] {
        let start = record * self.manifest.record_bytes + f.offset;
        &self.records[start..start + f.bytes()]
    }

    fn field(&self, name: &str) -> Result<&Field> {
        self.manifest.field(name).ok_or_else(|| {
            Error::file(
                self.dir.join(MANIFEST),
                format!("the cache has no field `{name}`"),
            )
        })
    }

    /// One field of one record as a tensor in its stored dtype.
    pub fn tensor(&self, record: usize, name: &str) -> Result<Tensor> {
        let f = self.field(name)?;
        Ok(Tensor::f_from_data_size(
            self.bytes(record, f),
            &f.shape,
            f.dtype.kind(),
        )?)
    }
}

impl Dataset for EncodedCache {
    fn len(&self) -> usize {
        self.valid.len()
    }

    fn cache_identity(&self) -> Option<(serde_json::Value, bool)> {
        Some((self.manifest.fingerprint.clone(), self.manifest.compact))
    }

    fn batch(&self, indices: &[usize], device: Device) -> Result<Batch> {
        let b = indices.len() as i64;
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.valid.len()) {
            return Err(Error::invalid(format!(
                "data encoded_cache: index {bad} past the end ({} samples)",
                self.valid.len()
            )));
        }
        // Fixed draws per batch, in this order: which caption, whether to drop it, then the
        // posterior noise.
        let pick = Vec::<f64>::try_from(Tensor::rand([b], (Kind::Double, Device::Cpu)))?;
        let drop = Vec::<f64>::try_from(Tensor::rand([b], (Kind::Double, Device::Cpu)))?;
        let cond_names: Vec<String> = self
            .manifest
            .fields
            .iter()
            .filter_map(|f| f.name.strip_prefix(COND_PREFIX).map(str::to_string))
            .collect();
        let mut means = Vec::with_capacity(indices.len());
        let mut stds = Vec::with_capacity(indices.len());
        let mut cond: BTreeMap<String, Vec<Tensor>> = BTreeMap::new();
        for (k, &i) in indices.iter().enumerate() {
            let r = self.valid[i];
            means.push(self.tensor(r, X0_MEAN)?.to_kind(Kind::Float));
            if self.manifest.field(X0_STD).is_some() {
                stds.push(self.tensor(r, X0_STD)?.to_kind(Kind::Float));
            }
            let count = self.bytes(r, self.field(CAPTION_COUNT)?)[0].max(1) as f64;
            let j = ((pick[k] * count) as i64).min(count as i64 - 1);
            for name in &cond_names {
                let t = if drop[k] < self.caption_dropout {
                    self.empty
                        .get(name)
                        .ok_or_else(|| Error::tensor(name, "missing from empty.safetensors"))?
                        .get(0)
                } else {
                    self.tensor(r, &format!("{COND_PREFIX}{name}"))?.get(j)
                };
                let t = if t.is_floating_point() {
                    t.to_kind(Kind::Float)
                } else {
                    t
                };
                cond.entry(name.clone()).or_default().push(t);
            }
        }
        let mut x0 = Tensor::stack(&means, 0);
        if !stds.is_empty() {
            let std = Tensor::stack(&stds, 0);
            let noise = Tensor::randn(x0.size(), (Kind::Float, Device::Cpu));
            x0 += std * noise;
        }
        let cond = Conditioning(
            cond.into_iter()
                .map(|(n, v)| (n, Tensor::stack(&v, 0).to_device(device)))
                .collect(),
        );
        Ok(Batch::encoded(x0.to_device(device), cond))
    }
}
