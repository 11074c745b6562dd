//! One weight file of a model folder behind one interface, so that loading is equally strict
//! whichever format a folder ships: safetensors (memory-mapped, read tensor by tensor) or a
//! `torch.save` zip pickle (`pytorch_model.bin`, `diffusion_pytorch_model.bin`; many older
//! diffusers folders and the released DDPO pipelines ship nothing else). A pickle is read by
//! the safe reader of `softalign_core::torch_pickle`: it is never executed, and one that names
//! any global besides tensor storage (which `torch.load` would import and may run) is refused.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use softalign_core::tensors::MappedSafetensors;
use softalign_core::torch_pickle::{read_tensors_allowing, STATE_DICT_GLOBALS};
use softalign_core::{Error, Result};
use tch::Tensor;

pub enum WeightFile {
    Safetensors(MappedSafetensors),
    /// A pickled state dict, read whole (a pickle has no index to read single tensors by).
    Pickle {
        path: PathBuf,
        tensors: BTreeMap<String, Tensor>,
    },
}

/// Whether `path` names a torch pickle rather than safetensors (by its extension, as diffusers
/// and transformers decide too).
pub fn is_pickle(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e == "bin" || e == "pt" || e == "pth")
}

impl WeightFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !is_pickle(path) {
            return Ok(Self::Safetensors(MappedSafetensors::open(path)?));
        }
        // The reader's messages start with the path already.
        let found = read_tensors_allowing(path, Some(STATE_DICT_GLOBALS))
            .map_err(|e| Error::invalid(format!("{e:#}")))?;
        let mut tensors = BTreeMap::new();
        for f in found {
            if f.key.is_empty() {
                return Err(Error::file(
                    path,
                    "holds a bare tensor, not a state dict of named tensors",
                ));
            }
            if tensors.contains_key(&f.key) {
                return Err(Error::file(
                    path,
                    format!("tensor `{}` appears twice in the pickle", f.key),
                ));
            }
            tensors.insert(f.key, f.tensor);
        }
        if tensors.is_empty() {
            return Err(Error::file(path, "holds no tensors"));
        }
        Ok(Self::Pickle {
            path: path.to_path_buf(),
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Safetensors(m) => m.path(),
            Self::Pickle { path, .. } => path,
        }
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        match self {
            Self::Safetensors(m) => m.names(),
            Self::Pickle { tensors, .. } => tensors.keys().cloned().collect(),
        }
    }

    pub fn shape(&self, name: &str) -> Result<Vec<i64>> {
        match self {
            Self::Safetensors(m) => m.shape(name),
            Self::Pickle { path, tensors } => Ok(pickled(path, tensors, name)?.size()),
        }
    }

    /// One tensor on the CPU, in the file's dtype.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        match self {
            Self::Safetensors(m) => m.tensor(name),
            Self::Pickle { path, tensors } => Ok(pickled(path, tensors, name)?.shallow_clone()),
        }
    }
}

fn pickled<'a>(
    path: &Path,
    tensors: &'a BTreeMap<String, Tensor>,
    name: &str,
) -> Result<&'a Tensor> {
    tensors
        .get(name)
        .ok_or_else(|| Error::file(path, format!("tensor `{name}`: not in the file")))
}
