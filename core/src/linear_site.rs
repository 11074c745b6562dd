//! Linear sites: every Linear layer of a backbone, named by its diffusers / transformers module
//! path (`transformer_blocks.3.attn.to_q`, `text_model.encoder.layers.5.self_attn.q_proj`).
//! A backbone builds its Linear layers so that, during a forward, each asks the active
//! [`SiteHook`] for a delta to add to its output; the backbone never learns what computes it
//! (LoRA today). The hook travels in a thread-local scope that the backbone's forward opens,
//! so the many inner modules need no extra argument.
use std::cell::RefCell;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::site::SiteHook;
use crate::{Error, Result};

/// One Linear layer: `name` is its path in the backbone's weights (the variable is
/// `{name}.weight`); `component` / `path` are how LoRA files name it (`transformer` +
/// `transformer_blocks.0.attn.to_q`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearSite {
    pub name: String,
    pub component: String,
    pub path: String,
    pub in_features: i64,
    pub out_features: i64,
}

impl LinearSite {
    /// A site of `component` whose weights the backbone names `{prefix}{path}` (`prefix` is
    /// empty when the component is the whole var store, `"transformer."` when it shares one).
    pub fn new(
        component: &str,
        prefix: &str,
        path: &str,
        in_features: i64,
        out_features: i64,
    ) -> Self {
        Self {
            name: format!("{prefix}{path}"),
            component: component.to_string(),
            path: path.to_string(),
            in_features,
            out_features,
        }
    }
}

/// The frozen layer a delta is asked for: its weight [out, in] and bias as the backbone holds
/// them (maybe bf16 / fp16), and its output `x W^T + b` for this input. Plain LoRA needs none
/// of it; DoRA rescales the output by the merged weight's row norms.
pub struct LinearBase<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub output: &'a Tensor,
}

/// Module paths and (in, out) of a model's Linear layers, relative to the model root; a
/// backbone turns them into [`LinearSite`]s with [`sites_of`].
pub type LinearShapes = Vec<(String, i64, i64)>;

pub fn sites_of(component: &str, prefix: &str, shapes: &LinearShapes) -> Vec<LinearSite> {
    shapes
        .iter()
        .map(|(p, i, o)| LinearSite::new(component, prefix, p, *i, *o))
        .collect()
}

struct Active {
    hook: *const (dyn SiteHook + 'static),
}

thread_local! {
    static ACTIVE: RefCell<Vec<Active>> = const { RefCell::new(Vec::new()) };
    static FAILED: RefCell<Option<Error>> = const { RefCell::new(None) };
    static COLLECT: RefCell<Option<LinearShapes>> = const { RefCell::new(None) };
}

/// Pops the scope even when `f` panics.
struct ScopeGuard;
impl Drop for ScopeGuard {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.borrow_mut().pop());
    }
}

/// Runs `f` (a backbone forward) with `hook` answering its linear sites. An error a hook
/// returns inside (a Linear's forward cannot return one) comes back from here.
pub fn with_hook<R>(hook: Option<&dyn SiteHook>, f: impl FnOnce() -> Result<R>) -> Result<R> {
    let Some(hook) = hook.filter(|h| h.has_linear_deltas()) else {
        return f();
    };
    // SAFETY: the pointer is only dereferenced by `delta` while this call is on the stack
    // (the guard pops it before `hook`'s borrow ends), on this thread.
    let hook: *const (dyn SiteHook + '_) = hook;
    let hook: *const (dyn SiteHook + 'static) = unsafe { std::mem::transmute(hook) };
    ACTIVE.with(|a| a.borrow_mut().push(Active { hook }));
    let guard = ScopeGuard;
    let out = f();
    drop(guard);
    if let Some(e) = FAILED.with(|e| e.borrow_mut().take()) {
        return Err(e);
    }
    out
}

/// What a Linear layer named `site` adds to its output for input `x`, asked of the innermost
/// active hook (None outside any scope, or where the hook has nothing for this site).
pub fn delta(site: &str, x: &Tensor, base: &LinearBase<'_>) -> Option<Tensor> {
    ACTIVE.with(|a| {
        let a = a.borrow();
        let top = a.last()?;
        // SAFETY: see `with_hook`.
        let hook = unsafe { &*top.hook };
        match hook.linear_delta(site, x, base) {
            Ok(d) => d,
            Err(e) => {
                FAILED.with(|f| {
                    let mut f = f.borrow_mut();
                    if f.is_none() {
                        *f = Some(e);
                    }
                });
                None
            }
        }
    })
}

/// Runs `f` (a model constructor) and returns what it built with the Linear layers it
/// registered through [`register`]: how tests check a model's [`LinearShapes`] function
/// against the layers it really has.
pub fn collect<R>(f: impl FnOnce() -> R) -> (R, LinearShapes) {
    COLLECT.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let r = f();
    let got = COLLECT.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (r, got)
}

/// Called by a backbone's Linear constructor.
pub fn register(name: &str, in_features: i64, out_features: i64) {
    COLLECT.with(|c| {
        if let Some(v) = c.borrow_mut().as_mut() {
            v.push((name.to_string(), in_features, out_features));
        }
    });
}

/// The nearest of `names` to `key` (for "no module named ..., nearest: ..." errors).
pub fn nearest<'a>(key: &str, names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    names
        .into_iter()
        .map(|n| (strsim::levenshtein(key, n), n))
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}
