//! `extends` chains and `--set` overrides, on plain TOML values before any typed parsing.
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use crate::{Error, Result};

/// One file of an `extends` chain, with its text kept for locating errors.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

/// Reads `path` and everything it extends, child last. Tables are merged key by key (the
/// child wins), except that a plugin table whose `type` changes replaces the base's whole
/// (its keys belong to another plugin); arrays, including arrays of tables like
/// `[[objective]]`, are replaced whole. Relative paths are made absolute against the folder
/// of the file that wrote them. A `.json` file is a resolved recipe (a run's recipe.json).
pub fn load_chain(path: &Path) -> Result<(Table, Vec<Source>)> {
    let mut stack = Vec::new();
    let mut sources = Vec::new();
    let table = load_rec(path, None, &mut stack, &mut sources)?;
    Ok((table, sources))
}

fn load_rec(
    path: &Path,
    from: Option<&Path>,
    stack: &mut Vec<PathBuf>,
    sources: &mut Vec<Source>,
) -> Result<Table> {
    let text = std::fs::read_to_string(path).map_err(|e| match from {
        Some(parent) => Error::file(
            parent,
            format!("extends `{}`, which cannot be read: {e}", path.display()),
        ),
        None => Error::file(path, e),
    })?;
    let canon = path.canonicalize().map_err(|e| Error::file(path, e))?;
    if let Some(pos) = stack.iter().position(|p| p == &canon) {
        let cycle: Vec<String> = stack[pos..]
            .iter()
            .chain(std::iter::once(&canon))
            .map(|p| p.display().to_string())
            .collect();
        return Err(Error::file(
            path,
            format!("`extends` forms a cycle: {}", cycle.join(" -> ")),
        ));
    }
    let mut table: Table = if path.extension().is_some_and(|e| e == "json") {
        from_json(&text).map_err(|e| Error::file(path, e))?
    } else {
        toml::from_str(&text).map_err(|e| Error::file(path, format!("invalid TOML: {e}")))?
    };
    let parent = match table.remove("extends") {
        None => None,
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            return Err(Error::file(
                path,
                format!(
                    "`extends` must be a file name string, not {}",
                    other.type_str()
                ),
            ))
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    super::paths::absolutize(&mut table, dir);
    stack.push(canon);
    let merged = match parent {
        None => table,
        Some(p) => {
            let mut base = load_rec(&dir.join(&p), Some(path), stack, sources)?;
            merge_into(&mut base, table);
            base
        }
    };
    stack.pop();
    sources.push(Source {
        path: path.to_path_buf(),
        text,
    });
    Ok(merged)
}

fn merge_into(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) if same_plugin(b, &o) => merge_into(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Whether two tables configure the same plugin: a child that switches `type` (coco to
/// encoded_cache) replaces the base's table instead of inheriting keys the new plugin lacks.
fn same_plugin(base: &Table, over: &Table) -> bool {
    match (base.get("type"), over.get("type")) {
        (Some(b), Some(o)) => b == o,
        _ => true,
    }
}

/// A resolved recipe written as JSON (`recipe.json`) as TOML data: `null` (an unset optional
/// field) is left out, as TOML has none.
fn from_json(text: &str) -> std::result::Result<Table, String> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    match json_to_toml(json) {
        Some(Value::Table(t)) => Ok(t),
        _ => Err("a recipe in JSON must be an object".into()),
    }
}

fn json_to_toml(v: serde_json::Value) -> Option<Value> {
    use serde_json::Value as J;
    Some(match v {
        J::Null => return None,
        J::Bool(b) => Value::Boolean(b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Float(n.as_f64()?),
        },
        J::String(s) => Value::String(s),
        J::Array(a) => Value::Array(a.into_iter().filter_map(json_to_toml).collect()),
        J::Object(o) => Value::Table(
            o.into_iter()
                .filter_map(|(k, v)| json_to_toml(v).map(|v| (k, v)))
                .collect(),
        ),
    })
}

/// Applies `key.path=value` (value parsed as TOML, else taken as a string). Numeric segments
/// index arrays: `objective.0.weight=2`.
pub fn apply_override(root: &mut Table, spec: &str) -> Result<()> {
    let bad = |m: String| Error::Recipe(format!("--set {spec}: {m}"));
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| bad("expected KEY=VALUE".into()))?;
    let segs: Vec<&str> = key.trim().split('.').collect();
    if segs.iter().any(|s| s.is_empty()) {
        return Err(bad("empty key segment".into()));
    }
    let mut value = parse_value(raw.trim());
    super::paths::absolutize_override(key.trim(), &mut value);
    let (last, parents) = segs.split_last().expect("split yields one segment");
    // Work on a copy so a failed override leaves `root` untouched.
    let mut doc = Value::Table(root.clone());
    let mut cur = &mut doc;
    for (k, seg) in parents.iter().enumerate() {
        cur = step(cur, seg).map_err(|m| bad(format!("`{}`: {m}", segs[..=k].join("."))))?;
    }
    match cur {
        Value::Table(t) => {
            t.insert(last.to_string(), value);
        }
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| bad(format!("`{last}` is not an array index")))?;
            let n = a.len();
            *a.get_mut(i)
                .ok_or_else(|| bad(format!("index {i} past the end ({n} entries)")))? = value;
        }
        other => {
            return Err(bad(format!(
                "`{}` is a {}, not a table",
                parents.join("."),
                other.type_str()
            )))
        }
    }
    let Value::Table(t) = doc else {
        unreachable!("root stays a table")
    };
    *root = t;
    Ok(())
}

fn step<'a>(cur: &'a mut Value, seg: &str) -> std::result::Result<&'a mut Value, String> {
    match cur {
        Value::Table(t) => {
            if !t.contains_key(seg) {
                t.insert(seg.to_string(), Value::Table(Table::new()));
            }
            t.get_mut(seg).ok_or_else(|| "no such key".to_string())
        }
        Value::Array(a) => {
            let i: usize = seg
                .parse()
                .map_err(|_| format!("`{seg}` is not an array index"))?;
            let n = a.len();
            a.get_mut(i)
                .ok_or_else(|| format!("index {i} past the end ({n} entries)"))
        }
        other => Err(format!("is a {}, not a table", other.type_str())),
    }
}

fn parse_value(raw: &str) -> Value {
    match toml::from_str::<Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => Value::String(raw.to_string()),
    }
}
