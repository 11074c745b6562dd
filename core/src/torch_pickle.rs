//! Tensors out of PyTorch zip checkpoints (`torch.save` since 1.6): `<archive>/data.pkl` is a
//! pickle whose tensors are `torch._utils._rebuild_tensor_v2` calls on persistent storage ids
//! `('storage', torch.<Type>Storage, key, location, numel)`, the storage bytes being the zip
//! member `<archive>/data/<key>` (little-endian). The pickle machine is repugnant-pickle's; this
//! file only finds the tensors in its value tree, wherever they sit (a bare tensor, a pickled
//! Parameter, a whole pickled module's `_parameters`), so no Python class is ever executed.
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context};
use repugnant_pickle::ops::PickleOp;
use repugnant_pickle::{SequenceType, Value};
use tch::{Kind, Tensor};

/// One tensor found in a checkpoint, with the key that leads to it (`_parameters.weight`, or
/// empty for a bare tensor / Parameter).
#[derive(Debug)]
pub struct Found {
    pub key: String,
    pub tensor: Tensor,
}

struct Spec {
    key: String,
    storage_kind: Kind,
    storage_key: String,
    offset: i64,
    shape: Vec<i64>,
    stride: Vec<i64>,
}

fn is_global(v: &Value, module: &str, name: &str) -> bool {
    matches!(v, Value::Raw(op) if **op == PickleOp::GLOBAL(module, name))
}

fn ints(v: &Value, what: &str) -> anyhow::Result<Vec<i64>> {
    match v {
        Value::Seq(SequenceType::Tuple, items) => items
            .iter()
            .map(|x| match x {
                Value::Int(n) => Ok(*n),
                other => bail!("{what}: expected an integer, got {other:?}"),
            })
            .collect(),
        other => bail!("{what}: expected a tuple, got {other:?}"),
    }
}

fn storage_kind(name: &str) -> anyhow::Result<Kind> {
    Ok(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        other => bail!("storage type `torch.{other}` is not supported"),
    })
}

fn rebuild_args(args: &[Value], key: &str) -> anyhow::Result<Spec> {
    let [Value::Seq(SequenceType::Tuple, a)] = args else {
        bail!("`{key}`: unexpected arguments to _rebuild_tensor_v2");
    };
    if a.len() < 4 {
        bail!("`{key}`: _rebuild_tensor_v2 takes at least 4 arguments");
    }
    let Value::PersId(pid) = &a[0] else {
        bail!("`{key}`: the tensor's storage is not a persistent id");
    };
    let Value::Seq(SequenceType::Tuple, pid) = pid.as_ref() else {
        bail!("`{key}`: unexpected persistent id {pid:?}");
    };
    let (stype, skey) = match pid.as_slice() {
        [Value::String("storage"), Value::Raw(op), Value::String(k), _, _] => match op.as_ref() {
            PickleOp::GLOBAL("torch", t) => (storage_kind(t)?, k.to_string()),
            other => bail!("`{key}`: unexpected storage type {other:?}"),
        },
        other => bail!("`{key}`: unexpected persistent id {other:?}"),
    };
    let Value::Int(offset) = a[1] else {
        bail!("`{key}`: storage offset is not an integer");
    };
    Ok(Spec {
        key: key.to_string(),
        storage_kind: stype,
        storage_key: skey,
        offset,
        shape: ints(&a[2], "shape")?,
        stride: ints(&a[3], "stride")?,
    })
}

/// Walks the value tree; `key` is the dictionary path so far.
fn walk(v: &Value, key: &str, out: &mut Vec<Spec>) -> anyhow::Result<()> {
    match v {
        Value::Global(target, args) if is_global(target, "torch._utils", "_rebuild_tensor_v2") => {
            out.push(rebuild_args(args, key)?);
        }
        Value::Global(target, args) | Value::Object(target, args) => {
            walk(target, key, out)?;
            for a in args {
                walk(a, key, out)?;
            }
        }
        Value::Build(target, state) => {
            walk(target, key, out)?;
            walk(state, key, out)?;
        }
        Value::Seq(SequenceType::Dict, items) => {
            // SETITEM adds a (key, value) tuple; SETITEMS a tuple of such tuples (one per
            // batch of up to 1000 items); a flat key, value, ... list also occurs.
            let pair = |k: &Value, v: &Value, out: &mut Vec<Spec>| {
                let k = match k {
                    Value::String(s) => s.to_string(),
                    other => format!("{other:?}"),
                };
                walk(v, &join(key, &k), out)
            };
            let mut pending: Option<String> = None;
            for item in items {
                match item {
                    Value::Seq(SequenceType::Tuple, kv)
                        if kv.len() == 2 && matches!(kv[0], Value::String(_)) =>
                    {
                        pair(&kv[0], &kv[1], out)?;
                    }
                    Value::Seq(SequenceType::Tuple, batch)
                        if !batch.is_empty()
                            && batch.iter().all(|b| {
                                matches!(b, Value::Seq(SequenceType::Tuple, kv) if kv.len() == 2)
                            }) =>
                    {
                        for b in batch {
                            if let Value::Seq(_, kv) = b {
                                pair(&kv[0], &kv[1], out)?;
                            }
                        }
                    }
                    Value::String(s) if pending.is_none() => pending = Some(s.to_string()),
                    other => {
                        let k = pending.take().unwrap_or_default();
                        walk(other, &join(key, &k), out)?;
                    }
                }
            }
        }
        Value::Seq(_, items) => {
            for item in items {
                walk(item, key, out)?;
            }
        }
        Value::PersId(inner) => walk(inner, key, out)?,
        _ => {}
    }
    Ok(())
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}.{b}")
    }
}

/// Every tensor stored in a PyTorch zip checkpoint, in pickle order, on the CPU.
pub fn read_tensors(path: &Path) -> anyhow::Result<Vec<Found>> {
    read_tensors_allowing(path, None)
}

/// The globals a plain state dict of tensors needs (`torch.save(dict_of_tensors)`).
pub const STATE_DICT_GLOBALS: &[&str] = &[
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "collections.OrderedDict",
    "torch.FloatStorage",
    "torch.DoubleStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.LongStorage",
    "torch.IntStorage",
];

/// [`read_tensors`], refusing a pickle that names any global outside `allowed`
/// (`module.name`): such a file would run that code in Python's `torch.load`, and is no
/// plain tensor file (nothing runs here either way).
pub fn read_tensors_allowing(path: &Path, allowed: Option<&[&str]>) -> anyhow::Result<Vec<Found>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(file).with_context(|| {
        format!(
            "{}: not a zip archive (torch.save's format since PyTorch 1.6)",
            path.display()
        )
    })?;
    let pkl = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .map(str::to_owned)
        .with_context(|| format!("{}: no data.pkl in the archive", path.display()))?;
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or("").to_string();
    let mut bytes = Vec::new();
    zip.by_name(&pkl)?.read_to_end(&mut bytes)?;
    let (_, ops) = repugnant_pickle::parse_ops::<nom::error::VerboseError<&[u8]>>(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: unreadable pickle: {e:?}", path.display()))?;
    if let Some(allowed) = allowed {
        for op in &ops {
            if let PickleOp::GLOBAL(module, name) = op {
                let full = format!("{module}.{name}");
                if !allowed.contains(&full.as_str()) {
                    bail!(
                        "{}: the pickle names the global `{full}`, which torch.load would import \
                         and may run; refusing it (a weights file holds only tensors)",
                        path.display()
                    );
                }
            }
        }
    }
    let (values, _) = repugnant_pickle::evaluate(&ops, true)
        .with_context(|| format!("{}: evaluating the pickle", path.display()))?;
    let mut specs = Vec::new();
    for v in &values {
        walk(v, "", &mut specs).with_context(|| format!("{}", path.display()))?;
    }
    let mut found = Vec::with_capacity(specs.len());
    for s in specs {
        let member = format!("{prefix}data/{}", s.storage_key);
        let mut raw = Vec::new();
        zip.by_name(&member)
            .with_context(|| format!("{}: no storage `{member}`", path.display()))?
            .read_to_end(&mut raw)?;
        let elem = s.storage_kind.elt_size_in_bytes();
        if raw.len() % elem != 0 {
            bail!(
                "{}: storage `{member}` is not a whole number of elements",
                path.display()
            );
        }
        let storage = Tensor::from_data_size(&raw, &[(raw.len() / elem) as i64], s.storage_kind);
        let needed = s.offset
            + s.shape
                .iter()
                .zip(&s.stride)
                .map(|(n, st)| (n - 1).max(0) * st)
                .sum::<i64>()
            + 1;
        if !s.shape.contains(&0) && needed > storage.size()[0] {
            bail!(
                "{}: tensor `{}` reaches past its storage `{member}`",
                path.display(),
                s.key
            );
        }
        let tensor = storage
            .as_strided(s.shape.as_slice(), s.stride.as_slice(), s.offset)
            .contiguous();
        found.push(Found { key: s.key, tensor });
    }
    Ok(found)
}

/// The one tensor of a file that holds exactly one (a pickled Parameter, or a module with a
/// single parameter such as nn.Embedding).
pub fn read_single(path: &Path) -> anyhow::Result<Found> {
    let mut all = read_tensors(path)?;
    match all.len() {
        1 => Ok(all.remove(0)),
        0 => bail!("{}: holds no tensor", path.display()),
        n => bail!(
            "{}: holds {n} tensors ({}), expected one",
            path.display(),
            all.iter()
                .map(|f| f.key.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
