//! The run folder's record of how a run was made: the resolved recipe, the command line, the
//! versions (softalign, libtorch, device) and the seed.
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::{Error, Result};

pub const RECIPE_FILE: &str = "recipe.json";
pub const COMMAND_FILE: &str = "command.txt";
pub const VERSIONS_FILE: &str = "versions.json";
pub const SEED_FILE: &str = "seed";

/// What the run folder records.
pub struct RunRecord<'a> {
    /// The resolved recipe (every default filled in), as JSON.
    pub recipe: &'a serde_json::Value,
    /// argv of this invocation.
    pub command: &'a [String],
    pub seed: u64,
    pub device: tch::Device,
    pub resumed: bool,
}

/// sha256 of the recipe's canonical JSON (object keys sorted), hex.
pub fn recipe_hash(recipe: &serde_json::Value) -> String {
    use sha2::{Digest, Sha256};
    let mut text = String::new();
    canonical(recipe, &mut text);
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// JSON with object keys sorted at every level, whatever serde_json's map order is (another
/// crate may switch on its `preserve_order` feature).
fn canonical(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::from(k.as_str()).to_string());
                out.push(':');
                canonical(&m[k], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The libtorch version this process runs, read next to the loaded libtorch library:
/// `version.py` of a pip-installed torch, or `build-version` of a standalone libtorch.
/// tch exposes no version call, and the binding's expected version would hide a mismatch.
pub fn libtorch_version() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let lib = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            let name = Path::new(p)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("");
            name.starts_with("libtorch_cpu.") || name == "libtorch.so"
        })
        .map(PathBuf::from)?;
    let root = lib.parent()?.parent()?;
    if let Ok(v) = std::fs::read_to_string(root.join("build-version")) {
        return Some(v.trim().to_string());
    }
    let py = std::fs::read_to_string(root.join("version.py")).ok()?;
    py.lines().find_map(|l| {
        let v = l.strip_prefix("__version__")?.split('=').nth(1)?.trim();
        Some(v.trim_matches(|c| c == '\'' || c == '"').to_string())
    })
}

pub fn device_description(device: tch::Device) -> String {
    match device {
        tch::Device::Cpu => format!("cpu ({} threads)", tch::get_num_threads()),
        tch::Device::Cuda(i) => format!(
            "cuda:{i} (of {} CUDA devices, cudnn {})",
            tch::Cuda::device_count(),
            if tch::Cuda::cudnn_is_available() {
                tch::utils::version_cudnn().to_string()
            } else {
                "unavailable".into()
            }
        ),
        other => format!("{other:?}"),
    }
}

fn write(path: PathBuf, bytes: &[u8]) -> Result<()> {
    crate::tensors::write_atomic(&path, bytes)
}

/// Creates the run folder and writes its record. On resume, the recipe and seed files are
/// left as they are (the trainer checks them) and the command line is appended.
pub fn write_run_record(run_dir: &Path, rec: &RunRecord<'_>) -> Result<()> {
    std::fs::create_dir_all(run_dir).map_err(|e| Error::file(run_dir, e))?;
    let pretty =
        |v: &serde_json::Value| serde_json::to_vec_pretty(v).map_err(|e| Error::file(run_dir, e));
    let line = format!("{}\n", shell_words(rec.command));
    let command_path = run_dir.join(COMMAND_FILE);
    if rec.resumed && command_path.exists() {
        let mut old =
            std::fs::read_to_string(&command_path).map_err(|e| Error::file(&command_path, e))?;
        old.push_str(&line);
        write(command_path, old.as_bytes())?;
    } else {
        write(command_path, line.as_bytes())?;
        write(run_dir.join(RECIPE_FILE), &pretty(rec.recipe)?)?;
        write(
            run_dir.join(SEED_FILE),
            format!("{}\n", rec.seed).as_bytes(),
        )?;
    }
    let versions = json!({
        "softalign": env!("CARGO_PKG_VERSION"),
        "tch": "0.24.0",
        "libtorch": libtorch_version(),
        "device": device_description(rec.device),
        "cuda_available": tch::Cuda::is_available(),
    });
    write(run_dir.join(VERSIONS_FILE), &pretty(&versions)?)
}

/// argv joined so it can be pasted back into a shell.
fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_files_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = json!({"train": {"steps": 3}});
        let cmd = vec!["softalign".to_string(), "train".into(), "it's".into()];
        let rec = RunRecord {
            recipe: &recipe,
            command: &cmd,
            seed: 42,
            device: tch::Device::Cpu,
            resumed: false,
        };
        write_run_record(dir.path(), &rec).unwrap();
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(RECIPE_FILE)).unwrap())
                .unwrap();
        assert_eq!(r, recipe);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(COMMAND_FILE)).unwrap(),
            "softalign train 'it'\\''s'\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join(SEED_FILE)).unwrap(),
            "42\n"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(VERSIONS_FILE)).unwrap())
                .unwrap();
        assert_eq!(v["softalign"], env!("CARGO_PKG_VERSION"));
        // This process links libtorch, so its version must be found (2.x.y).
        let lt = v["libtorch"].as_str().expect("libtorch version found");
        assert!(lt.starts_with("2."), "{lt}");
        assert!(v["device"].as_str().unwrap().starts_with("cpu"));
    }

    #[test]
    fn recipe_hash_ignores_key_order() {
        let a: serde_json::Value = serde_json::from_str(r#"{"a":1,"b":{"c":2,"d":3}}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"b":{"d":3,"c":2},"a":1}"#).unwrap();
        assert_eq!(recipe_hash(&a), recipe_hash(&b));
        assert_ne!(recipe_hash(&a), recipe_hash(&json!({"a": 2})));
    }
}
