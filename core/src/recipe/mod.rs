//! Recipes: TOML files parsed into plain serde data, with plugins as typetag specs.
//!
//! A recipe may `extends = "base.toml"` (tables merged key by key, arrays replaced whole) and
//! any value may be overridden from the command line (`--set train.lr=5e-4`). Errors name the
//! file, the line and the field. Relative paths inside a recipe are resolved against the folder
//! of the recipe named on the command line.
mod locate;
mod merge;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backbone::BackboneInfo;
use crate::catalogue::{self, PluginKind};
use crate::logging::LoggingConfig;
use crate::plugin::{
    AdapterSpec, BackboneSpec, BuildContext, DatasetSpec, ObjectiveSpec, SamplerSpec,
};
use crate::train::TrainConfig;
use crate::{Error, Result};

pub use merge::Source;

fn default_seed() -> u64 {
    42
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// A free-form name for run folders and reports.
    #[serde(default)]
    pub name: Option<String>,
    /// The one seed every random draw of a run derives from.
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub backbone: Box<dyn BackboneSpec>,
    #[serde(default)]
    pub adapter: Vec<Box<dyn AdapterSpec>>,
    #[serde(default)]
    pub objective: Vec<Box<dyn ObjectiveSpec>>,
    #[serde(default)]
    pub sampler: Option<Box<dyn SamplerSpec>>,
    #[serde(default)]
    pub data: Option<Box<dyn DatasetSpec>>,
    pub train: TrainConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
}

/// A parsed recipe with where it came from.
#[derive(Debug)]
pub struct LoadedRecipe {
    pub recipe: Recipe,
    /// The file named on the command line.
    pub path: PathBuf,
    /// Its folder: relative paths in the recipe resolve against it.
    pub dir: PathBuf,
    /// The `extends` chain, base first.
    pub chain: Vec<PathBuf>,
    pub overrides: Vec<String>,
    /// The resolved recipe (defaults filled in) as JSON.
    pub json: serde_json::Value,
    /// SHA-256 of `json` (canonical key order), as checkpoints record it.
    pub hash: String,
}

/// Reads a recipe, its `extends` chain and the `--set` overrides into typed data. Only syntax
/// and types are checked here; [`check`] validates values against the plugins.
pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedRecipe> {
    let (mut table, sources) = merge::load_chain(path)?;
    for o in overrides {
        merge::apply_override(&mut table, o)?;
    }
    let recipe = deserialize(&table, &sources, overrides)?;
    let json = serde_json::to_value(&recipe)
        .map_err(|e| Error::file(path, format!("cannot serialise: {e}")))?;
    let hash = crate::logging::run_dir::recipe_hash(&json);
    Ok(LoadedRecipe {
        recipe,
        path: path.to_path_buf(),
        dir: path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
        chain: sources.into_iter().map(|s| s.path).collect(),
        overrides: overrides.to_vec(),
        json,
        hash,
    })
}

fn deserialize(table: &toml::Table, sources: &[Source], overrides: &[String]) -> Result<Recipe> {
    // Round-trip through text so the deserializer sees one document; serde_path_to_error names
    // the field that failed, which we map back to the file and line where the user wrote it.
    let text = toml::to_string(table)
        .map_err(|e| Error::Recipe(format!("cannot re-encode recipe: {e}")))?;
    let de = toml::Deserializer::parse(&text)
        .map_err(|e| Error::Recipe(format!("cannot re-read recipe: {e}")))?;
    let err = match serde_path_to_error::deserialize::<_, Recipe>(de) {
        Ok(r) => return Ok(r),
        Err(e) => e,
    };
    let mut path: Vec<String> = err
        .path()
        .iter()
        .filter_map(|seg| match seg {
            serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
            serde_path_to_error::Segment::Map { key }
            | serde_path_to_error::Segment::Enum { variant: key } => Some(key.clone()),
            serde_path_to_error::Segment::Unknown => None,
        })
        .collect();
    let inner = err.into_inner();
    let message = inner.message().trim().to_string();
    let plugin = unknown_type_path(table, &message);
    if let Some(p) = &plugin {
        path = p.clone();
    } else if path.is_empty() && !message.starts_with("missing field") {
        path = inner
            .span()
            .map(|s| locate::path_at(&text, s.start))
            .unwrap_or_default();
    }
    let msg = match plugin.as_ref().and_then(|p| plugin_message(p, &message)) {
        Some(m) => format!("in `{}`: {m}", path.join(".")),
        None if path.is_empty() => message,
        None => format!("field `{}`: {message}", path.join(".")),
    };
    let dotted = path.join(".");
    let from_override = overrides.iter().find(|o| {
        let key = o.split('=').next().unwrap_or("").trim();
        !dotted.is_empty() && (dotted.starts_with(key) || key.starts_with(&dotted))
    });
    let whence = match (from_override, locate::defined_at(sources, &path)) {
        (Some(o), _) => format!("--set {o}"),
        (None, Some((file, line))) => format!("{} line {line}", file.display()),
        (None, None) => sources
            .last()
            .map(|s| s.path.display().to_string())
            .unwrap_or_default(),
    };
    Err(Error::Recipe(format!("recipe {whence}: {msg}")))
}

/// Typetag's errors carry no span: find the plugin table whose `type` is the unknown name.
fn unknown_type_path(table: &toml::Table, message: &str) -> Option<Vec<String>> {
    let name = message
        .split("unknown variant `")
        .nth(1)?
        .split('`')
        .next()?;
    let is_it = |v: &toml::Value| v.get("type").and_then(|t| t.as_str()) == Some(name);
    for kind in PluginKind::ALL {
        match table.get(kind.table()) {
            Some(toml::Value::Array(items)) => {
                if let Some(i) = items.iter().position(is_it) {
                    return Some(vec![kind.table().into(), i.to_string(), "type".into()]);
                }
            }
            Some(v) if is_it(v) => return Some(vec![kind.table().into(), "type".into()]),
            _ => {}
        }
    }
    None
}

/// Typetag reports an unknown `type` as an unknown variant; answer with the catalogue's names
/// and the nearest one.
fn plugin_message(path: &[String], message: &str) -> Option<String> {
    let rest = message.split("unknown variant `").nth(1)?;
    let name = rest.split('`').next()?;
    let table = path.first()?;
    let kind = PluginKind::ALL.into_iter().find(|k| k.table() == table)?;
    Some(catalogue::unknown_message(kind, name))
}

/// Everything that can be known without loading weights: values, plugin fields, sites against
/// the backbone's config, token sets the objectives need.
pub fn check(loaded: &LoadedRecipe) -> Result<BackboneInfo> {
    let r = &loaded.recipe;
    let ctx = BuildContext::cpu(&loaded.dir);
    let at = |what: &str, e: Error| {
        Error::Recipe(format!(
            "recipe {}: {what}: {}",
            loaded.path.display(),
            strip(e)
        ))
    };
    r.train.validate().map_err(|e| at("train", e))?;
    r.logging.validate().map_err(|e| at("logging", e))?;
    let info = r.backbone.describe(&ctx).map_err(|e| at("backbone", e))?;
    for (i, a) in r.adapter.iter().enumerate() {
        a.validate(&info)
            .map_err(|e| at(&format!("adapter[{i}]"), e))?;
    }
    for (i, o) in r.objective.iter().enumerate() {
        o.validate()
            .map_err(|e| at(&format!("objective[{i}]"), e))?;
        for (set, ema) in o.token_sets() {
            let provided = r.adapter.iter().any(|a| {
                a.token_sets()
                    .iter()
                    .any(|(s, e)| *s == set && (*e || !ema))
            });
            if !provided {
                return Err(at(
                    &format!("objective[{i}]"),
                    Error::invalid(format!(
                        "needs token set `{set}`{} but no adapter provides it",
                        if ema { " with EMA" } else { "" }
                    )),
                ));
            }
        }
    }
    if let Some(s) = &r.sampler {
        s.validate().map_err(|e| at("sampler", e))?;
    }
    if let Some(d) = &r.data {
        d.validate(&ctx).map_err(|e| at("data", e))?;
    }
    Ok(info)
}

fn strip(e: Error) -> String {
    match e {
        Error::Recipe(m) | Error::Invalid(m) => m,
        other => other.to_string(),
    }
}
