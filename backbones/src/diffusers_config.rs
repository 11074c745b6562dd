//! Reading and writing diffusers model `config.json` files: the class must match, diffusers'
//! bookkeeping keys are dropped, and any other unknown key is an error (the config structs deny
//! unknown fields), so a typo or a variant this code does not implement never loads silently.
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use softalign_core::{json_file, Error, Result};

/// Keys diffusers writes for its own bookkeeping; they carry no architecture.
pub const BOOKKEEPING: &[&str] = &[
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "_use_default_values",
    "_commit_hash",
];

/// The diffusers version whose configs the writers mirror.
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// `path` as a `T` of diffusers class `class`; errors name the file.
pub fn read<T: DeserializeOwned>(path: &Path, class: &str) -> Result<T> {
    let serde_json::Value::Object(mut map) = json_file::read_value(path)? else {
        return Err(Error::file(path, "not a JSON object"));
    };
    if let Some(c) = map.get("_class_name").and_then(|c| c.as_str()) {
        if c != class {
            return Err(Error::file(
                path,
                format!("`_class_name` is `{c}`, expected `{class}`"),
            ));
        }
    }
    map.retain(|k, _| !BOOKKEEPING.contains(&k.as_str()));
    json_file::from_value(serde_json::Value::Object(map)).map_err(|e| Error::file(path, e))
}

/// The config.json diffusers would write for `cfg` of class `class`.
pub fn to_json<T: Serialize>(cfg: &T, class: &str) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).expect("config serialises");
    let m = v.as_object_mut().expect("configs are structs");
    m.insert("_class_name".into(), class.into());
    m.insert("_diffusers_version".into(), DIFFUSERS_VERSION.into());
    v
}
