//! Recipes: TOML files parsed into plain serde data, with plugins as typetag specs.
//!
//! A recipe may `extends = "base.toml"` (tables merged key by key, a plugin table whose `type`
//! changes replaced, arrays replaced whole) and any value may be overridden from the command
//! line (`--set train.lr=5e-4`). Errors name the file, the line and the field. Relative paths
//! resolve against the file that wrote them (the working directory for `--set`); see
//! [`paths`]. A run's resolved `recipe.json` is itself a recipe.
mod locate;
mod merge;
pub mod paths;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backbone::BackboneInfo;
use crate::catalogue::{self, PluginKind};
use crate::logging::LoggingConfig;
use crate::plugin::{
    AdapterSpec, BackboneSpec, BuildContext, DatasetSpec, ObjectiveSpec, RewardSpec, SamplerSpec,
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
    /// The reward RL fine-tuning (DDPO) maximises.
    #[serde(default)]
    pub reward: Option<Box<dyn RewardSpec>>,
    /// Present: `train` runs DDPO (trajectories sampled with `[sampler]`, scored by `[reward]`)
    /// instead of `[[objective]]`s on `[data]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ddpo: Option<crate::train::ddpo::DdpoConfig>,
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
    let message = match did_you_mean(&message) {
        Some(hint) => format!("{message} ({hint})"),
        None => message,
    };
    let msg = match plugin.as_ref().and_then(|p| plugin_message(p, &message)) {
        Some(m) => format!("in `{}`: {m}", path.join(".")),
        None if path.is_empty() => message.clone(),
        None => format!("field `{}`: {message}", path.join(".")),
    };
    // An unknown key is reported at its table: point at the key itself, in the file that
    // wrote it.
    if let Some(key) = unknown_field(&message) {
        if path.last().map(String::as_str) != Some(key) {
            path.push(key.to_string());
        }
    }
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

/// The key serde's "unknown field `x`, expected ..." names.
fn unknown_field(message: &str) -> Option<&str> {
    message.strip_prefix("unknown field `")?.split('`').next()
}

/// "did you mean `lr`?" for an unknown field close to one of serde's expected names.
fn did_you_mean(message: &str) -> Option<String> {
    let field = unknown_field(message)?;
    let expected = message
        .split("expected one of ")
        .nth(1)
        .or_else(|| message.split("expected ").nth(1))?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|c| (strsim::jaro_winkler(field, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| format!("did you mean `{c}`?"))
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
    // The innermost plugin table on the path: a detector nested in an objective is a detector.
    let kind = path
        .iter()
        .rev()
        .find_map(|p| PluginKind::ALL.into_iter().find(|k| k.table() == p))?;
    Some(catalogue::unknown_message(kind, name))
}

/// What a command does with a recipe, which decides what [`check_for`] demands of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `recipe check`, `train`, `loss`: everything (adapters, objectives, data).
    Train,
    /// `cache`, `sample --recipe`, `eval --recipe`: the backbone and sampler. The adapters are
    /// never built, so their sites need not fit; the data is not read when sampling, and
    /// `cache` opens it itself.
    Backbone,
}

/// Everything that can be known without loading weights: values, plugin fields, sites against
/// the backbone's config, token sets the objectives need, files the adapters and data read,
/// and the data's image size against the backbone.
pub fn check(loaded: &LoadedRecipe) -> Result<BackboneInfo> {
    check_for(loaded, Purpose::Train)
}

/// [`check`] for a command that uses only part of the recipe.
pub fn check_for(loaded: &LoadedRecipe, purpose: Purpose) -> Result<BackboneInfo> {
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
    if purpose == Purpose::Train {
        for (i, a) in r.adapter.iter().enumerate() {
            a.validate(&info)
                .and_then(|_| a.check_files(&info, &ctx))
                .map_err(|e| at(&format!("adapter[{i}]"), e))?;
        }
        for (i, o) in r.objective.iter().enumerate() {
            check_objective(r, o.as_ref())
                .and_then(|_| o.check_files(&ctx))
                .map_err(|e| at(&format!("objective[{i}]"), e))?;
        }
    }
    if let Some(s) = &r.sampler {
        s.validate().map_err(|e| at("sampler", e))?;
    }
    if let Some(w) = &r.reward {
        w.validate(&ctx).map_err(|e| at("reward", e))?;
    }
    if let Some(d) = r.ddpo.as_ref().filter(|_| purpose == Purpose::Train) {
        d.validate(r.train.images_per_step, r.train.grad_accum)
            .map_err(|e| at("ddpo", e))?;
        if r.reward.is_none() {
            return Err(at(
                "ddpo",
                Error::Recipe("DDPO maximises a reward: add a [reward] table".into()),
            ));
        }
        if !r.objective.is_empty() || r.data.is_some() {
            return Err(at(
                "ddpo",
                Error::Recipe(
                    "DDPO trains on its own samples: remove [[objective]] and [data] (its \
                     prompts are `ddpo.prompts`)"
                        .into(),
                ),
            ));
        }
    }
    if let Some(d) = r.data.as_ref().filter(|_| purpose == Purpose::Train) {
        d.validate(&ctx).map_err(|e| at("data", e))?;
        if let Some((h, w)) = d.image_size() {
            r.backbone
                .check_image_size(&ctx, h, w)
                .map_err(|e| at("data", e))?;
        }
    }
    Ok(info)
}

fn check_objective(r: &Recipe, o: &dyn ObjectiveSpec) -> Result<()> {
    o.validate()?;
    let min = o.min_images_per_step();
    if r.train.images_per_step < min {
        return Err(Error::invalid(format!(
            "needs train.images_per_step >= {min}, got {} ({})",
            r.train.images_per_step,
            o.min_images_reason()
        )));
    }
    for (set, ema) in o.token_sets() {
        let provided = r.adapter.iter().any(|a| {
            a.token_sets()
                .iter()
                .any(|(s, e)| *s == set && (*e || !ema))
        });
        if !provided {
            return Err(Error::invalid(format!(
                "needs token set `{set}`{} but no adapter provides it",
                if ema { " with EMA" } else { "" }
            )));
        }
    }
    Ok(())
}

/// What `train` would refuse that is not an error in a recipe as such (a recipe without
/// `[data]` still serves `sample --recipe`): one line each, for `recipe check` to print.
pub fn training_notes(loaded: &LoadedRecipe) -> Vec<String> {
    let r = &loaded.recipe;
    let mut notes = Vec::new();
    if r.ddpo.is_some() {
        // DDPO samples its own data: neither table belongs in its recipe.
        return notes;
    }
    if r.data.is_none() {
        notes.push(format!(
            "recipe {}: no [data] table: `softalign train` needs one (e.g. type = \"coco\" or \
             \"image_manifest\"; `softalign list --examples` shows each)",
            loaded.path.display()
        ));
    }
    if r.objective.is_empty() {
        notes.push(format!(
            "recipe {}: no [[objective]]: `softalign train` needs at least one",
            loaded.path.display()
        ));
    }
    notes
}

fn strip(e: Error) -> String {
    match e {
        Error::Recipe(m) | Error::Invalid(m) => m,
        other => other.to_string(),
    }
}
