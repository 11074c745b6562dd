//! Safetensors in and out. Reading memory-maps the file and converts tensor by tensor, so a
//! checkpoint never sits twice in host memory (tch's `read_safetensors` reads it whole).
//! Writing goes to a temporary file that is renamed into place: a crash never leaves a
//! half-written file under the final name.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// A memory-mapped safetensors file.
pub struct MappedSafetensors {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

impl MappedSafetensors {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::file(&path, e))?;
        // SAFETY: the map is read-only; a file truncated underneath us by another process is
        // outside what any reader can defend against.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::file(&path, e))?;
        SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::file(&path, format!("not a valid safetensors file: {e}")))?;
        Ok(Self { path, mmap })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.mmap).expect("validated in open")
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.st().names().into_iter().map(String::from).collect();
        v.sort();
        v
    }

    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.mmap)
            .map_err(|e| Error::file(&self.path, format!("bad header: {e}")))?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    pub fn shape(&self, name: &str) -> Result<Vec<i64>> {
        let view = self.view(name)?;
        Ok(view.shape().iter().map(|&d| d as i64).collect())
    }

    fn view(&self, name: &str) -> Result<TensorView<'_>> {
        self.st()
            .tensor(name)
            .map_err(|e| Error::file(&self.path, format!("tensor `{name}`: {e}")))
    }

    /// Copies one tensor out of the map (on the CPU, in the file's dtype).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let view = self.view(name)?;
        view_to_tensor(&view).map_err(|e| Error::file(&self.path, format!("tensor `{name}`: {e}")))
    }

    /// Every tensor of the file, by name.
    pub fn all(&self) -> Result<BTreeMap<String, Tensor>> {
        self.names()
            .into_iter()
            .map(|n| Ok((n.clone(), self.tensor(&n)?)))
            .collect()
    }
}

fn st_kind(dtype: StDtype) -> Result<Kind> {
    Ok(match dtype {
        StDtype::F32 => Kind::Float,
        StDtype::F64 => Kind::Double,
        StDtype::F16 => Kind::Half,
        StDtype::BF16 => Kind::BFloat16,
        StDtype::I64 => Kind::Int64,
        StDtype::I32 => Kind::Int,
        StDtype::I16 => Kind::Int16,
        StDtype::I8 => Kind::Int8,
        StDtype::U8 => Kind::Uint8,
        StDtype::BOOL => Kind::Bool,
        other => return Err(Error::invalid(format!("unsupported dtype {other:?}"))),
    })
}

fn kind_st(kind: Kind) -> Result<StDtype> {
    Ok(match kind {
        Kind::Float => StDtype::F32,
        Kind::Double => StDtype::F64,
        Kind::Half => StDtype::F16,
        Kind::BFloat16 => StDtype::BF16,
        Kind::Int64 => StDtype::I64,
        Kind::Int => StDtype::I32,
        Kind::Int16 => StDtype::I16,
        Kind::Int8 => StDtype::I8,
        Kind::Uint8 => StDtype::U8,
        Kind::Bool => StDtype::BOOL,
        other => {
            return Err(Error::invalid(format!(
                "cannot store dtype {other:?} in safetensors"
            )))
        }
    })
}

fn view_to_tensor(view: &TensorView<'_>) -> Result<Tensor> {
    let kind = st_kind(view.dtype())?;
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?)
}

/// Writes tensors (any device; copied to the CPU) and string metadata atomically.
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(tch::Device::Cpu).contiguous();
        let dtype = kind_st(t.kind()).map_err(|e| Error::tensor(name, e))?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        if numel > 0 {
            t.f_copy_data_u8(&mut bytes, numel)?;
        }
        owned.push((name.clone(), dtype, shape, bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::tensor(n, e))
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    // An empty metadata map is written as no metadata: some readers reject `{}` there.
    let bytes = safetensors::tensor::serialize(views, (!meta.is_empty()).then_some(meta))
        .map_err(|e| Error::file(path, format!("serialising: {e}")))?;
    write_atomic(
        path,
        &canonical_header(bytes).map_err(|e| Error::file(path, e))?,
    )
}

/// The same file with its JSON header's keys sorted: safetensors writes the metadata from a
/// HashMap, whose order changes from process to process, so two identical runs would write
/// adapter files that differ in bytes. Offsets are relative to the data, so only the header
/// (padded with spaces to 8 bytes, as safetensors pads it) is rewritten.
fn canonical_header(bytes: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or("no header")?;
    let header = bytes.get(8..8 + n).ok_or("header past the end")?;
    // serde_json's Map is ordered by key (no `preserve_order`), so this sorts.
    let json: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("header: {e}"))?;
    let mut text = serde_json::to_vec(&json).map_err(|e| format!("header: {e}"))?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

#[cfg(test)]
mod canonical_tests {
    use super::*;

    #[test]
    fn identical_content_writes_identical_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let t = vec![("a".to_string(), Tensor::from_slice(&[1f32, 2.0]))];
        let meta: BTreeMap<String, String> = (0..16)
            .map(|i| (format!("key{i}"), format!("value{i}")))
            .collect();
        let files: Vec<Vec<u8>> = (0..4)
            .map(|i| {
                let p = dir.path().join(format!("{i}.safetensors"));
                save_safetensors(&p, &t, &meta).unwrap();
                std::fs::read(&p).unwrap()
            })
            .collect();
        assert!(files.windows(2).all(|w| w[0] == w[1]));
        // Still a valid file with its metadata and values.
        let f = MappedSafetensors::open(dir.path().join("0.safetensors")).unwrap();
        assert_eq!(
            f.metadata().unwrap().get("key7").map(String::as_str),
            Some("value7")
        );
        let v: Vec<f32> = f.tensor("a").unwrap().try_into().unwrap();
        assert_eq!(v, vec![1.0, 2.0]);
    }
}

/// SHA-256 over names, dtypes, shapes and bytes of `tensors` (in the given order).
pub fn digest(tensors: &[(String, Tensor)]) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (name, t) in tensors {
        let t = t.detach().to_device(tch::Device::Cpu).contiguous();
        h.update(name.as_bytes());
        h.update(format!("{:?}{:?}", t.kind(), t.size()).as_bytes());
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        if numel > 0 {
            t.f_copy_data_u8(&mut bytes, numel)?;
        }
        h.update(&bytes);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Writes a file through a sibling temporary and a rename, so readers see the old or the new
/// content, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::file(path, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        // A full disk leaves a partial temporary: removed, so the space is free again and no
        // stray file is left beside the old content (which is untouched).
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::file(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::file(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_including_empty_ones() {
        let dir = tempfile::tempdir().unwrap();
        for (n, meta) in [
            (0usize, BTreeMap::new()),
            (0, BTreeMap::from([("k".to_string(), "v".to_string())])),
            (2, BTreeMap::new()),
        ] {
            let path = dir.path().join(format!("f{n}-{}.safetensors", meta.len()));
            let tensors: Vec<(String, Tensor)> = (0..n)
                .map(|i| {
                    (
                        format!("t{i}"),
                        Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([2, 3]) * i as f64,
                    )
                })
                .collect();
            save_safetensors(&path, &tensors, &meta).unwrap();
            let f = MappedSafetensors::open(&path).unwrap();
            assert_eq!(f.names().len(), n);
            assert_eq!(f.metadata().unwrap().len(), meta.len());
            for (name, t) in &tensors {
                assert!(f.tensor(name).unwrap().equal(t));
            }
        }
        let bad = dir.path().join("bad.safetensors");
        std::fs::write(&bad, b"\x10\0\0\0\0\0\0\0{not json}      ").unwrap();
        let err = MappedSafetensors::open(&bad).err().unwrap().to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("not a valid safetensors"),
            "{err}"
        );
    }
}
