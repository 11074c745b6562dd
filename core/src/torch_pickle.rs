//! Tensors out of PyTorch zip checkpoints (`torch.save` since 1.6): `<archive>/data.pkl` is a
//! pickle whose tensors are `torch._utils._rebuild_tensor_v2` calls on persistent storage ids
//! `('storage', torch.<Type>Storage, key, location, numel)`, the storage bytes being the zip
//! member `<archive>/data/<key>` (little-endian). The pickle's opcodes are parsed by
//! repugnant-pickle; this file runs them on a small stack machine of its own that builds an
//! inert value graph (no Python class is ever executed, a GLOBAL is only a name) and finds the
//! tensors in it, wherever they sit (a bare tensor, a pickled Parameter, a whole pickled
//! module's `_parameters`).
//!
//! The files come from anywhere, so every cost is bounded by the file: the graph shares values
//! by index as Python does (DUP, GET and memo entries are references, never copies, so a
//! "billion laughs" pickle stays as small as its bytes), the walk that finds tensors has a
//! visit budget and a depth limit, the pickle and each storage member are size-checked before
//! they are read, and a tensor is materialised only when its view fits inside its storage.
use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

use anyhow::{bail, Context};
use repugnant_pickle::ops::PickleOp;
use tch::{Kind, Tensor};

/// One tensor found in a checkpoint, with the key that leads to it (`_parameters.weight`, or
/// empty for a bare tensor / Parameter).
#[derive(Debug)]
pub struct Found {
    pub key: String,
    pub tensor: Tensor,
}

/// The largest `data.pkl` read: a state dict's pickle is a few hundred bytes per tensor.
pub const MAX_PICKLE_BYTES: u64 = 16 << 20;
/// The most opcodes run (each makes at most one node of the value graph).
const MAX_OPS: usize = 2_000_000;
/// How deep the walk that finds tensors goes (a pickled module nests a few levels per
/// submodule).
const MAX_DEPTH: usize = 256;

struct Spec {
    key: String,
    storage_kind: Kind,
    storage_key: String,
    offset: i64,
    shape: Vec<i64>,
    stride: Vec<i64>,
}

type Id = u32;

/// One value of the pickle: what it is, and the items (tuple / list / set elements, appended
/// items, BUILD states) and pairs (dict entries, SETITEM(S) on an object) added to it.
#[derive(Default)]
struct Node<'a> {
    what: What<'a>,
    items: Vec<Id>,
    pairs: Vec<(Id, Id)>,
}

#[derive(Default)]
enum What<'a> {
    #[default]
    Other,
    Int(i64),
    Str(&'a str),
    Global(String, String),
    Tuple,
    List,
    Dict,
    /// A call (REDUCE, NEWOBJ, OBJ, INST): callee and argument tuple; never executed.
    Call(Id, Id),
    PersId(Id),
}

enum Slot {
    Mark,
    Value(Id),
}

/// The value graph of a pickle, built by running its opcodes without executing anything.
struct Machine<'a> {
    nodes: Vec<Node<'a>>,
    stack: Vec<Slot>,
    memo: HashMap<u32, Id>,
    allowed: Option<&'a [&'a str]>,
}

impl<'a> Machine<'a> {
    fn node(&mut self, what: What<'a>, items: Vec<Id>) -> Id {
        self.nodes.push(Node {
            what,
            items,
            pairs: Vec::new(),
        });
        (self.nodes.len() - 1) as Id
    }
    fn push(&mut self, what: What<'a>) {
        let id = self.node(what, Vec::new());
        self.stack.push(Slot::Value(id));
    }
    fn push_with(&mut self, what: What<'a>, items: Vec<Id>) {
        let id = self.node(what, items);
        self.stack.push(Slot::Value(id));
    }
    fn pop(&mut self) -> anyhow::Result<Id> {
        match self.stack.pop() {
            Some(Slot::Value(id)) => Ok(id),
            Some(Slot::Mark) => bail!("a value was expected, the stack holds a mark"),
            None => bail!("the stack is empty"),
        }
    }
    fn top(&self) -> anyhow::Result<Id> {
        match self.stack.last() {
            Some(Slot::Value(id)) => Ok(*id),
            Some(Slot::Mark) => bail!("a value was expected, the stack holds a mark"),
            None => bail!("the stack is empty"),
        }
    }
    /// The values above the topmost mark, which is removed.
    fn pop_mark(&mut self) -> anyhow::Result<Vec<Id>> {
        let at = self
            .stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .context("no mark on the stack")?;
        Ok(self
            .stack
            .drain(at..)
            .skip(1)
            .map(|s| match s {
                Slot::Value(id) => id,
                Slot::Mark => unreachable!("the topmost mark is at `at`"),
            })
            .collect())
    }
    fn str_of(&self, id: Id) -> Option<&'a str> {
        match self.nodes[id as usize].what {
            What::Str(s) => Some(s),
            _ => None,
        }
    }
    fn global(&mut self, module: &str, name: &str) -> anyhow::Result<What<'a>> {
        let full = format!("{module}.{name}");
        if let Some(allowed) = self.allowed {
            if !allowed.contains(&full.as_str()) {
                bail!(
                    "the pickle names the global `{full}`, which torch.load would import and may \
                     run; refusing it (a weights file holds only tensors)"
                );
            }
        }
        Ok(What::Global(module.to_string(), name.to_string()))
    }
    fn memo_get(&self, mid: u32) -> anyhow::Result<Id> {
        self.memo
            .get(&mid)
            .copied()
            .with_context(|| format!("memo entry {mid} is read before it is written"))
    }

    fn step(&mut self, op: PickleOp<'a>) -> anyhow::Result<bool> {
        use PickleOp as P;
        match op {
            P::STOP => return Ok(false),
            P::PROTO(_) | P::FRAME(_) => {}
            P::MARK => self.stack.push(Slot::Mark),
            P::POP => {
                self.stack.pop().context("POP on an empty stack")?;
            }
            P::POP_MARK => {
                self.pop_mark()?;
            }
            P::DUP => {
                let t = self.top()?;
                self.stack.push(Slot::Value(t));
            }
            P::BININT(n) => self.push(What::Int(n as i64)),
            P::BININT1(n) => self.push(What::Int(n as i64)),
            P::BININT2(n) => self.push(What::Int(n as i64)),
            P::INT(s) | P::LONG(s) => {
                let s = s.trim_end_matches('L');
                match s.parse::<i64>() {
                    Ok(n) => self.push(What::Int(n)),
                    Err(_) => self.push(What::Other),
                }
            }
            P::LONG1(b) | P::LONG4(b) => {
                // Two's complement, little-endian; beyond 8 bytes it is no shape or offset.
                if b.len() <= 8 {
                    let mut buf = if b.last().is_some_and(|x| x & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..b.len()].copy_from_slice(b);
                    self.push(What::Int(i64::from_le_bytes(buf)));
                } else {
                    self.push(What::Other);
                }
            }
            P::BINUNICODE(s)
            | P::SHORT_BINUNICODE(s)
            | P::BINUNICODE8(s)
            | P::UNICODE(s)
            | P::STRING(s) => self.push(What::Str(s)),
            P::BINSTRING(b) | P::SHORT_BINSTRING(b) => match std::str::from_utf8(b) {
                Ok(s) => self.push(What::Str(s)),
                Err(_) => self.push(What::Other),
            },
            P::NONE
            | P::NEWTRUE
            | P::NEWFALSE
            | P::FLOAT(_)
            | P::BINFLOAT(_)
            | P::BINBYTES(_)
            | P::SHORT_BINBYTES(_)
            | P::BINBYTES8(_)
            | P::BYTEARRAY8(_) => self.push(What::Other),
            P::GLOBAL(module, name) => {
                let g = self.global(module, name)?;
                self.push(g);
            }
            P::STACK_GLOBAL => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Some(m), Some(n)) = (self.str_of(module), self.str_of(name)) else {
                    bail!("STACK_GLOBAL on values that are not strings");
                };
                let g = self.global(m, n)?;
                self.push(g);
            }
            P::INST(module, name) => {
                let args = self.pop_mark()?;
                let g = self.global(module, name)?;
                let callee = self.node(g, Vec::new());
                let args = self.node(What::Tuple, args);
                self.push(What::Call(callee, args));
            }
            P::OBJ => {
                let mut v = self.pop_mark()?;
                if v.is_empty() {
                    bail!("OBJ without a class");
                }
                let callee = v.remove(0);
                let args = self.node(What::Tuple, v);
                self.push(What::Call(callee, args));
            }
            P::REDUCE | P::NEWOBJ => {
                let args = self.pop()?;
                let callee = self.pop()?;
                self.push(What::Call(callee, args));
            }
            P::NEWOBJ_EX => {
                let kwargs = self.pop()?;
                let args = self.pop()?;
                let callee = self.pop()?;
                self.push_with(What::Call(callee, args), vec![kwargs]);
            }
            P::BUILD => {
                let state = self.pop()?;
                let target = self.top()?;
                self.nodes[target as usize].items.push(state);
            }
            P::BINPERSID => {
                let pid = self.pop()?;
                self.push(What::PersId(pid));
            }
            P::PERSID(s) => {
                let pid = self.node(What::Str(s), Vec::new());
                self.push(What::PersId(pid));
            }
            P::EMPTY_TUPLE => self.push(What::Tuple),
            P::EMPTY_LIST => self.push(What::List),
            P::EMPTY_DICT => self.push(What::Dict),
            P::EMPTY_SET => self.push(What::List),
            P::TUPLE => {
                let v = self.pop_mark()?;
                self.push_with(What::Tuple, v);
            }
            P::TUPLE1 | P::TUPLE2 | P::TUPLE3 => {
                let n = match op {
                    P::TUPLE1 => 1,
                    P::TUPLE2 => 2,
                    _ => 3,
                };
                let mut v = (0..n)
                    .map(|_| self.pop())
                    .collect::<anyhow::Result<Vec<_>>>()?;
                v.reverse();
                self.push_with(What::Tuple, v);
            }
            P::LIST | P::FROZENSET => {
                let v = self.pop_mark()?;
                self.push_with(What::List, v);
            }
            P::DICT => {
                let v = self.pop_mark()?;
                if v.len() % 2 != 0 {
                    bail!("DICT with an odd number of items");
                }
                let id = self.node(What::Dict, Vec::new());
                self.nodes[id as usize].pairs = v.chunks(2).map(|p| (p[0], p[1])).collect();
                self.stack.push(Slot::Value(id));
            }
            P::APPEND => {
                let v = self.pop()?;
                let t = self.top()?;
                self.nodes[t as usize].items.push(v);
            }
            P::APPENDS | P::ADDITEMS => {
                let v = self.pop_mark()?;
                let t = self.top()?;
                self.nodes[t as usize].items.extend(v);
            }
            P::SETITEM => {
                let v = self.pop()?;
                let k = self.pop()?;
                let t = self.top()?;
                self.nodes[t as usize].pairs.push((k, v));
            }
            P::SETITEMS => {
                let v = self.pop_mark()?;
                if v.len() % 2 != 0 {
                    bail!("SETITEMS with an odd number of items");
                }
                let t = self.top()?;
                self.nodes[t as usize]
                    .pairs
                    .extend(v.chunks(2).map(|p| (p[0], p[1])));
            }
            P::PUT(s) => {
                let mid = s
                    .parse()
                    .context("PUT with a memo id that is not a number")?;
                self.memo.insert(mid, self.top()?);
            }
            P::BINPUT(mid) => {
                self.memo.insert(mid as u32, self.top()?);
            }
            P::LONG_BINPUT(mid) => {
                self.memo.insert(mid, self.top()?);
            }
            P::MEMOIZE => {
                let mid = self.memo.len() as u32;
                self.memo.insert(mid, self.top()?);
            }
            P::GET(s) => {
                let mid = s
                    .parse()
                    .context("GET with a memo id that is not a number")?;
                let id = self.memo_get(mid)?;
                self.stack.push(Slot::Value(id));
            }
            P::BINGET(mid) => {
                let id = self.memo_get(mid as u32)?;
                self.stack.push(Slot::Value(id));
            }
            P::LONG_BINGET(mid) => {
                let id = self.memo_get(mid)?;
                self.stack.push(Slot::Value(id));
            }
            other
            @ (P::EXT1(_) | P::EXT2(_) | P::EXT4(_) | P::NEXT_BUFFER | P::READONLY_BUFFER) => {
                bail!("opcode {other:?} has no place in a tensor file")
            }
        }
        Ok(true)
    }
}

/// Runs a pickle's opcodes up to STOP; returns the machine and the value left on top.
fn run<'a>(bytes: &'a [u8], allowed: Option<&'a [&'a str]>) -> anyhow::Result<(Machine<'a>, Id)> {
    let mut m = Machine {
        nodes: Vec::new(),
        stack: Vec::new(),
        memo: HashMap::new(),
        allowed,
    };
    let mut rest = bytes;
    let mut n = 0;
    loop {
        n += 1;
        if n > MAX_OPS {
            bail!("more than {MAX_OPS} pickle opcodes: no tensor file has that many");
        }
        let at = bytes.len() - rest.len();
        let (next, op) =
            repugnant_pickle::parsers::parse_op::<nom::error::VerboseError<&[u8]>>(rest)
                .map_err(|_| anyhow::anyhow!("unreadable pickle opcode at byte {at}"))?;
        rest = next;
        if !m
            .step(op)
            .with_context(|| format!("malformed pickle at byte {at}"))?
        {
            let top = m.top().context("the pickle ends with an empty stack")?;
            return Ok((m, top));
        }
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

struct Walk<'m, 'a> {
    m: &'m Machine<'a>,
    budget: usize,
    out: Vec<Spec>,
}

impl Walk<'_, '_> {
    fn ints(&self, id: Id, what: &str, key: &str) -> anyhow::Result<Vec<i64>> {
        let n = &self.m.nodes[id as usize];
        if !matches!(n.what, What::Tuple) {
            bail!("`{key}`: {what} is not a tuple");
        }
        n.items
            .iter()
            .map(|&i| match self.m.nodes[i as usize].what {
                What::Int(v) => Ok(v),
                _ => bail!("`{key}`: {what} holds something other than an integer"),
            })
            .collect()
    }

    fn rebuild(&self, args: Id, key: &str) -> anyhow::Result<Spec> {
        let nodes = &self.m.nodes;
        let a = &nodes[args as usize];
        if !matches!(a.what, What::Tuple) || a.items.len() < 4 {
            bail!("`{key}`: _rebuild_tensor_v2 takes a tuple of at least 4 arguments");
        }
        let What::PersId(pid) = nodes[a.items[0] as usize].what else {
            bail!("`{key}`: the tensor's storage is not a persistent id");
        };
        let pid = &nodes[pid as usize];
        let parts: Vec<&What> = pid.items.iter().map(|&i| &nodes[i as usize].what).collect();
        let (stype, skey) = match (&pid.what, parts.as_slice()) {
            (What::Tuple, [What::Str("storage"), What::Global(m, t), What::Str(k), _, _])
                if m == "torch" =>
            {
                (storage_kind(t)?, k.to_string())
            }
            _ => bail!("`{key}`: the persistent id is not ('storage', torch.<Type>Storage, key, location, numel)"),
        };
        // The key names a member of the archive: a plain name, never a path.
        if skey.is_empty() || !skey.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("`{key}`: storage key {skey:?} is not a plain name");
        }
        let What::Int(offset) = nodes[a.items[1] as usize].what else {
            bail!("`{key}`: storage offset is not an integer");
        };
        Ok(Spec {
            key: key.to_string(),
            storage_kind: stype,
            storage_key: skey,
            offset,
            shape: self.ints(a.items[2], "the shape", key)?,
            stride: self.ints(a.items[3], "the stride", key)?,
        })
    }

    fn walk(&mut self, id: Id, key: &str, depth: usize) -> anyhow::Result<()> {
        if depth > MAX_DEPTH {
            bail!("the pickle nests values more than {MAX_DEPTH} deep");
        }
        if self.budget == 0 {
            bail!("the pickle's values refer to each other more often than any tensor file's do");
        }
        self.budget -= 1;
        let m = self.m;
        let n = &m.nodes[id as usize];
        match n.what {
            What::Call(callee, args) => {
                if let What::Global(module, name) = &m.nodes[callee as usize].what {
                    if module == "torch._utils" && name == "_rebuild_tensor_v2" {
                        let spec = self.rebuild(args, key)?;
                        self.out.push(spec);
                        return Ok(());
                    }
                }
                self.walk(args, key, depth + 1)?;
            }
            What::PersId(inner) => self.walk(inner, key, depth + 1)?,
            _ => {}
        }
        for &item in &n.items {
            self.walk(item, key, depth + 1)?;
        }
        for &(k, v) in &n.pairs {
            let k = match m.nodes[k as usize].what {
                What::Str(s) => s.to_string(),
                What::Int(i) => i.to_string(),
                _ => "?".to_string(),
            };
            self.walk(v, &join(key, &k), depth + 1)?;
        }
        Ok(())
    }
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}.{b}")
    }
}

/// The tensor specs of a pickle (no storage read). Public for the fuzz harness, which feeds
/// it raw bytes.
#[doc(hidden)]
pub fn scan_pickle(bytes: &[u8], allowed: Option<&[&str]>) -> anyhow::Result<usize> {
    Ok(specs(bytes, allowed)?.len())
}

fn specs(bytes: &[u8], allowed: Option<&[&str]>) -> anyhow::Result<Vec<Spec>> {
    let (m, top) = run(bytes, allowed)?;
    // Each node is visited about once in a state dict (tied weights: twice); a budget a few
    // times the graph refuses graphs whose shared references multiply the work.
    let mut w = Walk {
        budget: 4 * m.nodes.len() + 1024,
        m: &m,
        out: Vec::new(),
    };
    w.walk(top, "", 0)?;
    Ok(w.out)
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
    let len = file
        .metadata()
        .with_context(|| format!("{}", path.display()))?
        .len();
    read_zip(file, len, allowed).with_context(|| format!("{}", path.display()))
}

/// [`read_tensors_allowing`] on an archive of `len` bytes in memory or on disk; errors do not
/// name the file (the caller adds it).
pub fn read_zip<R: Read + Seek>(
    reader: R,
    len: u64,
    allowed: Option<&[&str]>,
) -> anyhow::Result<Vec<Found>> {
    let mut zip = zip::ZipArchive::new(reader)
        .context("not a zip archive (torch.save's format since PyTorch 1.6)")?;
    for name in zip.file_names() {
        // Nothing is extracted to disk, but a member reaching outside the archive's folder is
        // no torch.save's: refuse the archive rather than guess.
        let p = Path::new(name);
        if !p
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            bail!("archive member {name:?} is not a plain relative path (path traversal?)");
        }
    }
    let pkl = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .map(str::to_owned)
        .context("no data.pkl in the archive")?;
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or("").to_string();
    let bytes = read_member(&mut zip, &pkl, MAX_PICKLE_BYTES.min(len))?;
    let specs = specs(&bytes, allowed)?;
    // Every byte materialised comes from a storage member; tied tensors share one, so the
    // total is bounded by a small multiple of the archive (not by what the pickle claims).
    let mut budget = len.saturating_mul(4).saturating_add(1 << 20);
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut found = Vec::with_capacity(specs.len());
    for s in specs {
        let member = format!("{prefix}data/{}", s.storage_key);
        if !storages.contains_key(&member) {
            let raw = read_member(&mut zip, &member, len)?;
            let elem = s.storage_kind.elt_size_in_bytes();
            if raw.len() % elem != 0 {
                bail!("storage `{member}` is not a whole number of elements");
            }
            let t = Tensor::f_from_data_size(&raw, &[(raw.len() / elem) as i64], s.storage_kind)?;
            storages.insert(member.clone(), t);
        }
        let storage = &storages[&member];
        if storage.kind() != s.storage_kind {
            bail!("storage `{member}` is read as two different types");
        }
        let have = storage.size()[0];
        let numel = check_view(&s, have)
            .with_context(|| format!("tensor `{}` (storage `{member}`)", s.key))?;
        let bytes = (numel as u64).saturating_mul(s.storage_kind.elt_size_in_bytes() as u64);
        budget = budget.checked_sub(bytes).with_context(|| {
            format!(
                "tensor `{}`: the tensors materialise more bytes than the archive holds",
                s.key
            )
        })?;
        let tensor = storage
            .f_as_strided(s.shape.as_slice(), s.stride.as_slice(), s.offset)?
            .f_contiguous()?;
        found.push(Found { key: s.key, tensor });
    }
    Ok(found)
}

/// The number of elements of `s`'s view, refused unless every element lies inside a storage
/// of `have` elements (no negative sizes, strides or offset; no overflow) and the view is no
/// larger than the storage (an expanded view of a small storage would allocate far more than
/// the file holds).
fn check_view(s: &Spec, have: i64) -> anyhow::Result<i64> {
    if s.shape.len() != s.stride.len() {
        bail!(
            "shape {:?} and stride {:?} differ in length",
            s.shape,
            s.stride
        );
    }
    if s.offset < 0 || s.shape.iter().chain(&s.stride).any(|&v| v < 0) {
        bail!(
            "negative offset, size or stride (offset {}, shape {:?}, stride {:?})",
            s.offset,
            s.shape,
            s.stride
        );
    }
    let numel = s
        .shape
        .iter()
        .try_fold(1i64, |a, &n| a.checked_mul(n))
        .context("its shape's element count overflows")?;
    if numel == 0 {
        return Ok(0);
    }
    let last = s
        .shape
        .iter()
        .zip(&s.stride)
        .try_fold(s.offset, |a, (&n, &st)| {
            (n - 1).checked_mul(st).and_then(|x| a.checked_add(x))
        })
        .context("its extent overflows")?;
    if last >= have {
        bail!(
            "reaches element {last} of a storage of {have} (shape {:?}, stride {:?}, offset {})",
            s.shape,
            s.stride,
            s.offset
        );
    }
    if numel > have {
        bail!("a view of {numel} elements over a storage of {have}: refusing to materialise it");
    }
    Ok(numel)
}

/// The bytes of one archive member, refused (before reading) when it claims more than `max`.
fn read_member<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    max: u64,
) -> anyhow::Result<Vec<u8>> {
    let f = zip
        .by_name(name)
        .with_context(|| format!("archive member `{name}`"))?;
    if f.size() > max {
        bail!(
            "archive member `{name}` claims {} bytes, more than the archive can hold ({max}): \
             refusing it (a zip bomb?)",
            f.size()
        );
    }
    let mut out = Vec::new();
    f.take(max)
        .read_to_end(&mut out)
        .with_context(|| format!("reading archive member `{name}`"))?;
    Ok(out)
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
