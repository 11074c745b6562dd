//! LoRA files in: PEFT folders, diffusers pipeline files (`lora_A`/`lora_B`, `lora.down`/
//! `lora.up`, `lora_linear_layer`), the old attention-processor dialect (ddpo-pytorch's pickled
//! `.bin`) and kohya (see [`super::kohya`]), recognised from the keys and read into one form:
//! per adapted module its component, module path, down (A), up (B) and scale. Scales follow
//! each tool: PEFT alpha/r (alpha/sqrt r with rslora, per-module patterns), diffusers metadata
//! when present, else alpha = r; kohya `.alpha` (missing or 0: r).
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::kohya;
use crate::tensors::MappedSafetensors;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Peft,
    Diffusers,
    Processor,
    Kohya,
}

impl std::fmt::Display for Dialect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dialect::Peft => "PEFT",
            Dialect::Diffusers => "diffusers",
            Dialect::Processor => "attention-processor (diffusers 0.17)",
            Dialect::Kohya => "kohya",
        })
    }
}

/// One adapted module.
#[derive(Debug)]
pub struct LoraEntry {
    pub component: String,
    pub path: String,
    /// The file's key for the down / A tensor (error messages name it).
    pub key: String,
    /// [r, in] (or [r, in, kh, kw] for a kohya conv).
    pub down: Tensor,
    /// [out, r] (or [out, r, 1, 1]).
    pub up: Tensor,
    pub scale: f64,
    /// DoRA's magnitude vector [out].
    pub magnitude: Option<Tensor>,
}

#[derive(Debug)]
pub struct LoraWeights {
    pub source: PathBuf,
    pub dialect: Dialect,
    pub entries: Vec<LoraEntry>,
}

/// What reading needs to know about the model: the component an un-prefixed file is for, and
/// the module paths per component (kohya names lose their dots and are mapped back by
/// lookup; SDXL's SGM names need the UNet's layers_per_block).
#[derive(Debug, Clone, Default)]
pub struct ReadContext {
    pub default_component: String,
    pub modules: BTreeMap<String, Vec<String>>,
    pub unet_layers_per_block: Option<i64>,
}

/// Component prefixes of diffusers pipeline files.
pub const COMPONENTS: [&str; 5] = [
    "unet",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
];

struct Raw {
    file: PathBuf,
    tensors: BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
    /// The LoRA settings of a PEFT folder's adapter_config.json.
    peft_config: Option<Settings>,
}

fn open(path: &Path) -> Result<Raw> {
    if path.is_dir() {
        let cfg = path.join("adapter_config.json");
        if cfg.is_file() {
            let settings = Settings::from_json(crate::json_file::read_value(&cfg)?)
                .map_err(|e| Error::file(&cfg, e))?;
            let weights = ["adapter_model.safetensors", "adapter_model.bin"]
                .iter()
                .map(|n| path.join(n))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    Error::file(
                        path,
                        "a PEFT folder without adapter_model.safetensors or .bin",
                    )
                })?;
            let mut raw = open_file(&weights)?;
            raw.peft_config = Some(settings);
            return Ok(raw);
        }
        for n in [
            "pytorch_lora_weights.safetensors",
            "pytorch_lora_weights.bin",
        ] {
            if path.join(n).is_file() {
                return open_file(&path.join(n));
            }
        }
        return Err(Error::file(
            path,
            "no LoRA file here (adapter_config.json + adapter_model.safetensors, or \
             pytorch_lora_weights.safetensors / .bin)",
        ));
    }
    open_file(path)
}

fn open_file(path: &Path) -> Result<Raw> {
    if !path.is_file() {
        return Err(Error::file(path, "LoRA file not found"));
    }
    let is_pickle = path
        .extension()
        .is_some_and(|e| e == "bin" || e == "pt" || e == "pth");
    let (tensors, metadata) = if is_pickle {
        let found = crate::torch_pickle::read_tensors_allowing(
            path,
            Some(crate::torch_pickle::STATE_DICT_GLOBALS),
        )
        .map_err(|e| Error::file(path, format!("{e:#}")))?;
        (
            found.into_iter().map(|f| (f.key, f.tensor)).collect(),
            HashMap::new(),
        )
    } else {
        let st = MappedSafetensors::open(path)?;
        (st.all()?, st.metadata()?)
    };
    if tensors.is_empty() {
        return Err(Error::file(path, "holds no tensors"));
    }
    Ok(Raw {
        file: path.to_path_buf(),
        tensors,
        metadata,
        peft_config: None,
    })
}

fn dialect_of(key: &str) -> Option<Dialect> {
    if kohya::is_kohya(key) {
        return Some(Dialect::Kohya);
    }
    if key.contains(".processor.") || key.contains("_lora.down.") || key.contains("_lora.up.") {
        return Some(Dialect::Processor);
    }
    if key.contains(".lora_A.")
        || key.contains(".lora_B.")
        || key.contains(".lora.down.")
        || key.contains(".lora.up.")
        || key.contains(".lora_linear_layer.")
        || key.ends_with(".lora_magnitude_vector")
        || key.ends_with(".lora_magnitude_vector.weight")
    {
        return Some(Dialect::Diffusers);
    }
    None
}

/// Reads a LoRA file or folder of any supported dialect.
pub fn read(path: &Path, ctx: &ReadContext) -> Result<LoraWeights> {
    let raw = open(path)?;
    let file = raw.file.clone();
    let mut dialect: Option<(Dialect, String)> = None;
    for k in raw.tensors.keys() {
        let d = dialect_of(k).ok_or_else(|| {
            Error::file(
                &file,
                format!(
                    "key `{k}` is no LoRA key of any known dialect (PEFT, diffusers, \
                         attention processor, kohya)"
                ),
            )
        })?;
        // The processor and diffusers forms coexist in diffusers' own conversions; kohya
        // never mixes with them.
        match &dialect {
            None => dialect = Some((d, k.clone())),
            Some((d0, k0)) if (*d0 == Dialect::Kohya) != (d == Dialect::Kohya) => {
                return Err(Error::file(
                    &file,
                    format!("mixes LoRA dialects: `{k0}` is {d0}, `{k}` is {d}"),
                ))
            }
            _ => {}
        }
    }
    let (mut dialect, _) = dialect.expect("non-empty");
    if raw.peft_config.is_some() {
        dialect = Dialect::Peft;
    } else if dialect == Dialect::Diffusers && raw.tensors.keys().any(|k| k.contains(".processor."))
    {
        dialect = Dialect::Processor;
    }
    let entries = match dialect {
        Dialect::Kohya => kohya::entries(&file, raw.tensors, ctx)?,
        _ => diffusers_entries(&file, raw, ctx)?,
    };
    Ok(LoraWeights {
        source: file,
        dialect,
        entries,
    })
}

#[derive(Default)]
struct Parts {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    magnitude: Option<Tensor>,
}

/// `(module key, role)` of a PEFT / diffusers / processor key, the module key still carrying
/// its component prefix where it had one.
fn split_key(key: &str, text_component: bool) -> Option<(String, &'static str)> {
    const ENDS: [(&str, &str); 10] = [
        (".lora_A.weight", "down"),
        (".lora_B.weight", "up"),
        (".lora.down.weight", "down"),
        (".lora.up.weight", "up"),
        (".lora_linear_layer.down.weight", "down"),
        (".lora_linear_layer.up.weight", "up"),
        (".lora_magnitude_vector.weight", "magnitude"),
        (".lora_magnitude_vector", "magnitude"),
        ("_lora.down.weight", "down"),
        ("_lora.up.weight", "up"),
    ];
    for (end, role) in ENDS {
        if let Some(stem) = key.strip_suffix(end) {
            let mut m = stem.replace(".processor.", ".");
            // The processor dialect names the projection `to_q_lora`: `stem` ends in `to_q`.
            if end.starts_with("_lora") {
                if let Some(s) = m.strip_suffix("to_out") {
                    m = format!("{s}to_out.0");
                }
                if text_component {
                    for (a, b) in [
                        ("to_q", "q_proj"),
                        ("to_k", "k_proj"),
                        ("to_v", "v_proj"),
                        ("to_out.0", "out_proj"),
                    ] {
                        if let Some(s) = m.strip_suffix(a) {
                            m = format!("{s}{b}");
                        }
                    }
                }
            }
            return Some((m, role));
        }
    }
    None
}

/// PEFT-style per-module settings (`rank_pattern` / `alpha_pattern` keys are module-name
/// suffixes or regexes; suffixes are what the tools write).
struct Settings {
    alpha: Option<f64>,
    rslora: bool,
    alpha_pattern: Vec<(String, f64)>,
}

impl Settings {
    /// The keys that decide a scale; a PEFT config's other keys (task type, target modules,
    /// ...) are not read. One of the wrong type is an error naming it, never a silent scale
    /// of 1.
    fn from_json(v: serde_json::Value) -> Result<Self, crate::json_file::FieldError> {
        #[derive(serde::Deserialize)]
        struct Keys {
            lora_alpha: Option<f64>,
            use_rslora: Option<bool>,
            alpha_pattern: Option<BTreeMap<String, f64>>,
        }
        let k: Keys = crate::json_file::from_value(v)?;
        Ok(Self {
            alpha: k.lora_alpha,
            rslora: k.use_rslora.unwrap_or(false),
            alpha_pattern: k
                .alpha_pattern
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.trim_start_matches('^').to_string(), v))
                .collect(),
        })
    }
    fn scale(&self, path: &str, rank: i64) -> f64 {
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| super::suffix_match(path, k))
            .map(|(_, a)| *a)
            .or(self.alpha)
            .unwrap_or(rank as f64);
        super::scale(alpha, rank, self.rslora)
    }
}

/// The settings diffusers' `lora_adapter_metadata` gives `component` (keys prefixed
/// `component.`; an un-prefixed model-level file has them bare).
fn metadata_settings(
    meta: &HashMap<String, String>,
    component: &str,
    file: &Path,
) -> Result<Option<Settings>> {
    let Some(text) = meta.get("lora_adapter_metadata") else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        Error::file(
            file,
            format!("header `lora_adapter_metadata` is not JSON: {e}"),
        )
    })?;
    let Some(obj) = v.as_object() else {
        return Err(Error::file(
            file,
            "header `lora_adapter_metadata` is not a JSON object",
        ));
    };
    let pre = format!("{component}.");
    let mut mine = serde_json::Map::new();
    for (k, val) in obj {
        if let Some(rest) = k.strip_prefix(&pre) {
            mine.insert(rest.to_string(), val.clone());
        } else if !COMPONENTS.iter().any(|c| k.starts_with(&format!("{c}."))) {
            mine.entry(k.clone()).or_insert(val.clone());
        }
    }
    Settings::from_json(serde_json::Value::Object(mine))
        .map(Some)
        .map_err(|e| Error::file(file, format!("header `lora_adapter_metadata`: {e}")))
}

fn diffusers_entries(file: &Path, raw: Raw, ctx: &ReadContext) -> Result<Vec<LoraEntry>> {
    // module (component, path) -> parts, in file order of first appearance
    let mut parts: BTreeMap<(String, String), Parts> = BTreeMap::new();
    for (key, t) in raw.tensors {
        if key.ends_with(".lora_B.bias") || key.ends_with(".dora_scale") {
            return Err(Error::file(
                file,
                format!("key `{key}`: LoRA biases and LyCORIS dora_scale are not supported"),
            ));
        }
        let bare = key.strip_prefix("base_model.model.").unwrap_or(&key);
        let (component, rest) = match COMPONENTS
            .iter()
            .find(|c| bare.starts_with(&format!("{c}.")))
        {
            Some(c) => (c.to_string(), &bare[c.len() + 1..]),
            None => (ctx.default_component.clone(), bare),
        };
        let text = component.starts_with("text_encoder");
        let (module, role) = split_key(rest, text)
            .ok_or_else(|| Error::file(file, format!("key `{key}`: not a LoRA A/B key")))?;
        let p = parts.entry((component, module)).or_default();
        match role {
            "down" => p.down = Some((key.clone(), t)),
            "up" => p.up = Some((key.clone(), t)),
            _ => p.magnitude = Some(t),
        }
    }
    let peft = raw.peft_config.as_ref();
    let mut out = Vec::new();
    for ((component, path), p) in parts {
        let (key, down) = p.down.ok_or_else(|| {
            Error::file(
                file,
                format!("module `{component}.{path}` has an up/B tensor but no down/A"),
            )
        })?;
        let (ukey, up) = p
            .up
            .ok_or_else(|| Error::file(file, format!("key `{key}` has no matching up/B tensor")))?;
        check_pair(file, &key, &down, &ukey, &up)?;
        let rank = down.size()[0];
        let scale = match &peft {
            Some(s) => s.scale(&path, rank),
            None => match metadata_settings(&raw.metadata, &component, file)? {
                Some(s) => s.scale(&path, rank),
                // diffusers today: no alphas and no metadata means alpha = r.
                None => 1.0,
            },
        };
        out.push(LoraEntry {
            component,
            path,
            key,
            down,
            up,
            scale,
            magnitude: p.magnitude,
        });
    }
    Ok(out)
}

/// down [r, in, ...] and up [out, r, ...] agree on r.
pub fn check_pair(file: &Path, dkey: &str, down: &Tensor, ukey: &str, up: &Tensor) -> Result<()> {
    let (d, u) = (down.size(), up.size());
    if d.len() < 2 || u.len() < 2 || d.len() != u.len() {
        return Err(Error::file(
            file,
            format!("`{dkey}` {d:?} and `{ukey}` {u:?} are not a LoRA pair of matrices"),
        ));
    }
    if d[0] != u[1] {
        return Err(Error::file(
            file,
            format!(
                "rank mismatch: `{dkey}` has rank {} ({d:?}) but `{ukey}` has {} ({u:?})",
                d[0], u[1]
            ),
        ));
    }
    Ok(())
}
