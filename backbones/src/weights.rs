//! Strict loading of diffusers / transformers checkpoints (safetensors, or torch pickles where a
//! folder ships nothing else) into a `VarStore`.
//!
//! Every model variable must come from the checkpoint and every checkpoint tensor must be
//! used (tch's `VarStore::load` fills missing variables with nothing and ignores extras), unless
//! an explicit allow-list says otherwise. Safetensors files are memory-mapped and copied tensor
//! by tensor straight into the variables, converting to the variable's dtype on the way.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use softalign_core::{Error, Result};
use tch::nn::VarStore;

use crate::weight_file::WeightFile;

/// The weight files of a diffusers model folder: `{stem}.safetensors`, or the shards listed in
/// `{stem}.safetensors.index.json`; else one precision variant as diffusers saves it with
/// `variant = "fp16"` (`{stem}.fp16.safetensors`, or `{stem}.safetensors.index.fp16.json`
/// and its shards). Values are cast to the dtype asked for, so which variant only matters
/// when there are several: that is an error naming them. Without any safetensors, the torch
/// pickle `{pickle stem}.bin` or the shards of its `.bin.index.json` (see [`pickle_stem`]).
pub fn weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.is_file() {
        return index_files(dir, &index);
    }
    let variants = variant_files(dir, stem);
    match variants.as_slice() {
        [(_, Variant::Single(p))] => Ok(vec![p.clone()]),
        [(_, Variant::Index(p))] => index_files(dir, p),
        [] => pickle_files(dir, stem),
        many => Err(Error::file(
            dir,
            format!(
                "holds several weight variants ({}) and no {stem}.safetensors; keep one",
                many.iter()
                    .map(|(v, _)| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// The stem of the pickled twin of `{stem}.safetensors`: transformers names its pickles
/// `pytorch_model.bin` beside `model.safetensors`; diffusers keeps the stem
/// (`diffusion_pytorch_model.bin`).
pub fn pickle_stem(stem: &str) -> String {
    if stem == "model" {
        "pytorch_model".to_string()
    } else {
        stem.to_string()
    }
}

/// `{pickle stem}.bin`, or the shards its `.bin.index.json` lists.
fn pickle_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let pstem = pickle_stem(stem);
    let single = dir.join(format!("{pstem}.bin"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(format!("{pstem}.bin.index.json"));
    if index.is_file() {
        return index_files(dir, &index);
    }
    Err(Error::file(
        dir,
        format!(
            "holds neither {stem}.safetensors nor {stem}.safetensors.index.json (nor a variant \
             such as {stem}.fp16.safetensors, nor a torch pickle {pstem}.bin or \
             {pstem}.bin.index.json)"
        ),
    ))
}

enum Variant {
    Single(PathBuf),
    Index(PathBuf),
}

/// `{stem}.{v}.safetensors` and `{stem}.safetensors.index.{v}.json` files, by variant `v`
/// (an index wins over a single file of the same variant).
fn variant_files(dir: &Path, stem: &str) -> Vec<(String, Variant)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: BTreeMap<String, Variant> = BTreeMap::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let index = name
            .strip_prefix(&format!("{stem}.safetensors.index."))
            .and_then(|r| r.strip_suffix(".json"));
        let single = name
            .strip_prefix(&format!("{stem}."))
            .and_then(|r| r.strip_suffix(".safetensors"));
        match (index, single) {
            (Some(v), _) if !v.is_empty() && !v.contains('.') => {
                found.insert(v.to_string(), Variant::Index(e.path()));
            }
            (None, Some(v)) if !v.is_empty() && !v.contains('.') && !v.contains('-') => {
                found
                    .entry(v.to_string())
                    .or_insert(Variant::Single(e.path()));
            }
            _ => {}
        }
    }
    found.into_iter().collect()
}

/// The shard files an index's `weight_map` names.
fn index_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let json = softalign_core::json_file::read_value(index)?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::file(index, "no `weight_map` object"))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::file(
                index,
                format!("field `weight_map.{name}`: expected a file name"),
            )
        })?;
        // A shard is a file beside the index: a name reaching elsewhere (`../`, `/etc/...`) is
        // no download's.
        let plain = Path::new(file)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain || file.is_empty() {
            return Err(Error::file(
                index,
                format!("field `weight_map.{name}`: `{file}` is not a file name in this folder"),
            ));
        }
        let p = dir.join(file);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod variant_tests {
    use super::weight_files;

    #[test]
    fn fp16_variants_single_and_sharded() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let stem = "diffusion_pytorch_model";
        assert!(weight_files(d, stem).is_err());
        std::fs::write(d.join(format!("{stem}.fp16.safetensors")), b"x").unwrap();
        assert_eq!(
            weight_files(d, stem).unwrap(),
            vec![d.join(format!("{stem}.fp16.safetensors"))]
        );
        // Sharded fp16: the index names the shards.
        let shards = [
            format!("{stem}.fp16-00001-of-00002.safetensors"),
            format!("{stem}.fp16-00002-of-00002.safetensors"),
        ];
        let index =
            serde_json::json!({"weight_map": {"a": shards[0], "b": shards[1], "c": shards[0]}});
        std::fs::write(
            d.join(format!("{stem}.safetensors.index.fp16.json")),
            index.to_string(),
        )
        .unwrap();
        assert_eq!(
            weight_files(d, stem).unwrap(),
            vec![d.join(&shards[0]), d.join(&shards[1])]
        );
        // Two variants and no plain file: which one is ambiguous.
        std::fs::write(d.join(format!("{stem}.bf16.safetensors")), b"x").unwrap();
        let e = weight_files(d, stem).unwrap_err().to_string();
        assert!(e.contains("bf16, fp16"), "{e}");
        // The plain file wins over any variant.
        std::fs::write(d.join(format!("{stem}.safetensors")), b"x").unwrap();
        assert_eq!(
            weight_files(d, stem).unwrap(),
            vec![d.join(format!("{stem}.safetensors"))]
        );
    }
}

/// What a partial load may leave out, by exact name or by prefix ending in `.` or `*`
/// (`transformer_blocks.3.` or `transformer_blocks.3*`).
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    /// Model variables that may be absent from the checkpoint (they keep their init).
    pub missing: Vec<String>,
    /// Checkpoint tensors that may go unused.
    pub unused: Vec<String>,
}

fn allowed(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| {
        if let Some(prefix) = p.strip_suffix('*') {
            name.starts_with(prefix)
        } else if p.ends_with('.') {
            name.starts_with(p.as_str())
        } else {
            p == name
        }
    })
}

/// What a load did.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub loaded: usize,
    /// Allowed-missing variables that kept their init.
    pub missing: Vec<String>,
    /// Allowed-unused checkpoint tensors.
    pub unused: Vec<String>,
}

fn list(names: &[String]) -> String {
    const MAX: usize = 20;
    if names.len() <= MAX {
        names.join(", ")
    } else {
        format!(
            "{}, ... ({} more)",
            names[..MAX].join(", "),
            names.len() - MAX
        )
    }
}

/// Copies the tensors of `files` (safetensors or torch pickles) into the variables of `vs`
/// (names as in the files), after checking that the names and shapes agree. Nothing is copied
/// when any check fails.
pub fn load_strict(vs: &VarStore, files: &[PathBuf], allow: &AllowList) -> Result<LoadReport> {
    let opened = open_all(files)?;
    load_strict_opened(vs, &opened, allow)
}

/// Opens every weight file (a pickle is read whole here, once).
pub fn open_all(files: &[PathBuf]) -> Result<Vec<WeightFile>> {
    files.iter().map(WeightFile::open).collect()
}

/// [`load_strict`] on files already opened (a loader that first looks at the names).
pub fn load_strict_opened(
    vs: &VarStore,
    maps: &[WeightFile],
    allow: &AllowList,
) -> Result<LoadReport> {
    let mut source: BTreeMap<String, usize> = BTreeMap::new();
    for (k, m) in maps.iter().enumerate() {
        for n in m.names() {
            if let Some(prev) = source.insert(n.clone(), k) {
                return Err(Error::file(
                    m.path(),
                    format!(
                        "tensor `{n}` is also in {} (shards must not overlap)",
                        maps[prev].path().display()
                    ),
                ));
            }
        }
    }
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut missing = Vec::new();
    let mut missing_allowed = Vec::new();
    let mut plan = Vec::new();
    for name in names {
        match source.get(name) {
            Some(&k) => {
                let want = vars[name].size();
                let have = maps[k].shape(name)?;
                if want != have {
                    return Err(Error::file(
                        maps[k].path(),
                        format!("tensor `{name}` has shape {have:?}, the model expects {want:?}"),
                    ));
                }
                plan.push((name.clone(), k));
            }
            None if allowed(&allow.missing, name) => missing_allowed.push(name.clone()),
            None => missing.push(name.clone()),
        }
    }
    let mut unused = Vec::new();
    let mut unused_allowed = Vec::new();
    for n in source.keys().filter(|n| !vars.contains_key(*n)) {
        if allowed(&allow.unused, n) {
            unused_allowed.push(n.clone());
        } else {
            unused.push(n.clone());
        }
    }
    let where_ = list(
        &maps
            .iter()
            .map(|f| f.path().display().to_string())
            .collect::<Vec<_>>(),
    );
    if !missing.is_empty() || !unused.is_empty() {
        let mut msg = String::new();
        if !missing.is_empty() {
            msg.push_str(&format!(
                "{} model tensor(s) missing from the checkpoint: {}",
                missing.len(),
                list(&missing)
            ));
        }
        if !unused.is_empty() {
            if !msg.is_empty() {
                msg.push_str("; ");
            }
            msg.push_str(&format!(
                "{} checkpoint tensor(s) the model does not use: {}",
                unused.len(),
                list(&unused)
            ));
        }
        msg.push_str(&format!(" (checkpoint: {where_})"));
        return Err(Error::invalid(msg));
    }
    let _guard = tch::no_grad_guard();
    for (name, k) in &plan {
        let src = maps[*k].tensor(name)?;
        let mut dst = vars[name].shallow_clone();
        dst.f_copy_(&src.to_device(dst.device()).to_kind(dst.kind()))
            .map_err(|e| Error::file(maps[*k].path(), format!("tensor `{name}`: {e}")))?;
    }
    Ok(LoadReport {
        loaded: plan.len(),
        missing: missing_allowed,
        unused: unused_allowed,
    })
}

/// The variables of `vs` sorted by name, ready for `save_safetensors`.
pub fn named_variables(vs: &VarStore) -> Vec<(String, tch::Tensor)> {
    let mut v: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
