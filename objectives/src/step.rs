//! The step context: one batch of B images crossed with its B captions, one timestep and one
//! noise draw shared by every pair, and the predictions the objectives asked for, each distinct
//! (token selection, grad) group computed once and shared by every objective that wants it.
//!
//! Chunked forwards (`pairs_per_forward`) keep the gradients exact in two passes: pass 1 runs
//! every chunk without a graph, wraps the gradient-carrying predictions as leaves, evaluates
//! the objectives and backpropagates to those leaves (dL/dpred); pass 2 re-runs each chunk with
//! a graph and backpropagates the cached dL/dpred of its pairs into the adapters. Objectives
//! only see the adapters through predictions, so the sum over chunks is the unchunked gradient.
//!
//! Split over ranks (`contrastive_scope = "global"`, [`StepContext::split_pairs`]), the same
//! two passes serve data parallelism: every rank holds the whole step, computes only its share
//! of the pairs in pass 1, and the shares are summed into the full predictions on every rank;
//! each rank then backpropagates its own share in pass 2, and the ranks' gradients, summed by
//! the trainer, are the gradient of the whole step.
use std::cell::Cell;
use std::collections::BTreeMap;

use softalign_core::adapter::{Adapter, Injection, TokenSelection};
use softalign_core::backbone::{Backbone, Conditioning};
use softalign_core::objective::{Objective, PredictionRequest, StepView};
use softalign_core::site::SiteHook;
use softalign_core::train::Collective;
use softalign_core::{Error, Result};
use tch::{Kind, Tensor};

/// One step's data: clean latents, caption conditioning (caption i belongs to image i), the
/// noise and the model timestep.
pub struct StepInputs {
    /// (B, C, H, W).
    pub x0: Tensor,
    pub cond: Conditioning,
    /// (C, H, W), shared by every image, or (B, C, H, W), one per image.
    pub noise: Tensor,
    /// The model timestep shared by the step: shape () or (1,), or one per image (B,).
    pub timestep: Tensor,
    /// The captions as text, where the data gives them (objectives that read captions).
    pub captions: Option<Vec<String>>,
    /// Image i (< B/2) preferred over image i + B/2; both share caption, timestep and noise.
    pub preference_pairs: bool,
}

/// How a step is run.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepOptions {
    /// Pairs per backbone forward (None: each group in one forward).
    pub pairs_per_forward: Option<i64>,
    /// Backpropagate `loss_scale * total` into the adapters' `.grad` (None: no gradients).
    pub backward: Option<f64>,
}

/// What a step produced.
#[derive(Debug, Clone)]
pub struct StepResult {
    /// Every objective's terms in order, the loss first; names made unique.
    pub terms: Vec<(String, f64)>,
    /// sum_k weight_k * loss_k.
    pub total: f64,
    /// Backbone forwards run (both passes when chunked).
    pub forwards: usize,
}

/// A group of predictions that one (token selection, grad) pair shares.
struct Group {
    /// (B, B) flags: which (image, caption) pairs some request asked for.
    mask: Vec<bool>,
    /// (B, B, C, H, W), zeros where no request asked.
    preds: Option<Tensor>,
}

pub struct StepContext<'a> {
    backbone: &'a dyn Backbone,
    /// None: the bare backbone (every selection, EMA included, gives the same prediction).
    adapters: Option<&'a [Box<dyn Adapter>]>,
    b: i64,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    x_t: Tensor,
    target: Tensor,
    cond: Conditioning,
    captions: Option<Vec<String>>,
    preference_pairs: bool,
    groups: BTreeMap<(TokenSelection, bool), Group>,
    forwards: Cell<usize>,
    /// The ranks that share this step's pairs (None: this process computes them all).
    ranks: Option<&'a dyn Collective>,
}

impl<'a> StepContext<'a> {
    pub fn new(
        backbone: &'a dyn Backbone,
        adapters: Option<&'a [Box<dyn Adapter>]>,
        inputs: StepInputs,
    ) -> Result<Self> {
        let dev = backbone.device();
        // Objectives run in fp32 whatever the backbone's precision; an fp64 batch keeps fp64
        // throughout (gradient checks).
        let kind = match inputs.x0.kind() {
            Kind::Double => Kind::Double,
            _ => Kind::Float,
        };
        let x0 = inputs.x0.to_device(dev).to_kind(kind);
        let size = x0.size();
        if size.len() != 4 {
            return Err(Error::tensor(
                "x0",
                format!("shape {size:?}, expected (B, C, H, W)"),
            ));
        }
        let b = size[0];
        let cb = inputs.cond.batch()?;
        if cb != b {
            return Err(Error::tensor(
                "conditioning",
                format!("{cb} captions for {b} images; caption i belongs to image i"),
            ));
        }
        let noise = inputs.noise.to_device(dev).to_kind(kind);
        let noise = match noise.size() {
            s if s == size => noise,
            s if s[..] == size[1..] => noise.unsqueeze(0).expand(&size, false).contiguous(),
            s => {
                return Err(Error::tensor(
                    "noise",
                    format!(
                        "shape {s:?}, expected {:?} (shared) or {size:?} (per image)",
                        &size[1..]
                    ),
                ))
            }
        };
        let t = inputs.timestep.to_device(dev).to_kind(kind);
        let t = match t.size().as_slice() {
            [] | [1] => t.reshape([1]).expand([b], false).contiguous(),
            [n] if *n == b => t,
            s => {
                return Err(Error::tensor(
                    "timestep",
                    format!("shape {s:?}, expected (), (1,) or ({b},)"),
                ))
            }
        };
        if let Some(c) = &inputs.captions {
            if c.len() as i64 != b {
                return Err(Error::invalid(format!(
                    "{} caption texts for {b} images; caption i belongs to image i",
                    c.len()
                )));
            }
        }
        if inputs.preference_pairs {
            check_pairs_share_t_and_noise(b, &t, &noise)?;
        }
        let np = backbone.noise();
        let x_t = np.add_noise(&x0, &noise, &t);
        let target = np.target(&x0, &noise, &t);
        Ok(Self {
            backbone,
            adapters,
            b,
            x0,
            noise,
            t,
            x_t,
            target,
            cond: inputs.cond,
            captions: inputs.captions,
            preference_pairs: inputs.preference_pairs,
            groups: BTreeMap::new(),
            forwards: Cell::new(0),
            ranks: None,
        })
    }

    /// Splits the pairs over the ranks of `c`, which all hold this same step.
    pub fn split_pairs(mut self, c: &'a dyn Collective) -> Self {
        if c.world() > 1 {
            self.ranks = Some(c);
        }
        self
    }

    /// This rank's share of `pairs`: a contiguous block, the blocks as even as can be.
    fn share(&self, pairs: Vec<i64>) -> Vec<i64> {
        match self.ranks {
            None => pairs,
            Some(c) => {
                let (n, w, r) = (pairs.len(), c.world(), c.rank());
                pairs[n * r / w..n * (r + 1) / w].to_vec()
            }
        }
    }

    pub fn forwards(&self) -> usize {
        self.forwards.get()
    }

    /// Without adapters every selection is the bare backbone: one group serves them all. With
    /// adapters that all start with the same set, "the first set" (None) names that set, so
    /// e.g. DSM's default tokens share AGSM's `positive` predictions.
    fn key(&self, sel: &TokenSelection, grad: bool) -> (TokenSelection, bool) {
        let Some(adapters) = self.adapters else {
            return (TokenSelection::default(), grad);
        };
        if sel.adapters_off {
            return (TokenSelection::adapters_off(), grad);
        }
        let mut sel = sel.clone();
        if sel.set.is_none() {
            let firsts: Vec<Option<String>> = adapters
                .iter()
                .map(|a| a.token_sets().into_iter().next())
                .collect();
            if let Some(Some(first)) = firsts.first() {
                if firsts.iter().all(|f| f.as_ref() == Some(first)) {
                    sel.set = Some(first.clone());
                }
            }
        }
        (sel, grad)
    }

    /// Collects the objectives' requests into groups (the union of pairs per group).
    pub fn plan(&mut self, requests: &[PredictionRequest]) {
        let b = self.b;
        for r in requests {
            let key = self.key(&r.tokens, r.grad);
            let g = self.groups.entry(key).or_insert_with(|| Group {
                mask: vec![false; (b * b) as usize],
                preds: None,
            });
            for i in 0..b {
                for j in 0..b {
                    if r.pairs.contains(i, j) {
                        g.mask[(i * b + j) as usize] = true;
                    }
                }
            }
        }
    }

    fn pair_indices(&self, mask: &[bool]) -> Vec<i64> {
        (0..self.b * self.b).filter(|k| mask[*k as usize]).collect()
    }

    /// Runs the backbone on flat pairs `k = i * B + j` (image i, caption j).
    fn forward_pairs(&self, sel: &TokenSelection, pairs: &[i64]) -> Result<Tensor> {
        let dev = self.x0.device();
        let img = Tensor::from_slice(&pairs.iter().map(|k| k / self.b).collect::<Vec<_>>())
            .to_device(dev);
        let cap = Tensor::from_slice(&pairs.iter().map(|k| k % self.b).collect::<Vec<_>>())
            .to_device(dev);
        let x_t = self.x_t.index_select(0, &img);
        let t = self.t.index_select(0, &img);
        let cond = self.cond.index_select(&cap);
        let injection = self
            .adapters
            .filter(|_| !sel.adapters_off)
            .map(|adapters| Injection {
                adapters,
                selection: sel.clone(),
            });
        let hook = injection.as_ref().map(|h| h as &dyn SiteHook);
        self.forwards.set(self.forwards.get() + 1);
        let out = self.backbone.forward(&x_t, &t, &cond, hook)?;
        Ok(out.to_kind(self.x0.kind()))
    }

    fn chunks(&self, pairs: &[i64], per: Option<i64>) -> Vec<Vec<i64>> {
        let n = per.map_or(pairs.len(), |p| p.max(1) as usize).max(1);
        pairs.chunks(n).map(<[i64]>::to_vec).collect()
    }

    /// (B*B, C, H, W) zeros with the chunks' predictions scattered into their pairs.
    fn assemble(&self, parts: Vec<(Vec<i64>, Tensor)>) -> Tensor {
        let s = self.x0.size();
        let mut full = Tensor::zeros(
            [self.b * self.b, s[1], s[2], s[3]],
            (self.x0.kind(), self.x0.device()),
        );
        for (pairs, p) in parts {
            let idx = Tensor::from_slice(&pairs).to_device(self.x0.device());
            full = full.index_copy(0, &idx, &p);
        }
        full
    }

    fn shape5(&self, flat: Tensor) -> Tensor {
        let s = self.x0.size();
        flat.reshape([self.b, self.b, s[1], s[2], s[3]])
    }

    /// Computes every group: gradient-carrying groups with a graph when `graph`, else without.
    fn compute(&mut self, per: Option<i64>, graph: bool) -> Result<()> {
        let keys: Vec<(TokenSelection, bool)> = self.groups.keys().cloned().collect();
        for key in keys {
            let pairs = self.share(self.pair_indices(&self.groups[&key].mask));
            let with_graph = graph && key.1;
            let mut parts = Vec::new();
            for chunk in self.chunks(&pairs, per) {
                let p = if with_graph {
                    self.forward_pairs(&key.0, &chunk)?
                } else {
                    let _guard = tch::no_grad_guard();
                    self.forward_pairs(&key.0, &chunk)?
                };
                parts.push((chunk, p));
            }
            let full = if with_graph {
                self.assemble(parts)
            } else {
                let _guard = tch::no_grad_guard();
                let full = self.assemble(parts);
                if let Some(c) = self.ranks {
                    // Each rank's share sits among zeros: the sum is every pair, exactly.
                    c.allreduce_sum(&[full.shallow_clone()], "the pair predictions")?;
                }
                full
            };
            let full = self.shape5(full);
            self.groups.get_mut(&key).expect("key listed").preds = Some(full);
        }
        Ok(())
    }

    /// Objectives' terms, the weighted total as a tensor, and the flat (name, value) list.
    fn terms(&self, objectives: &[Box<dyn Objective>]) -> Result<(Tensor, Vec<(String, f64)>)> {
        let kind = self.x0.kind();
        let mut total = Tensor::zeros([], (kind, self.x0.device()));
        let mut out: Vec<(String, f64)> = Vec::new();
        for o in objectives {
            let terms = o.terms(self)?;
            let Some(first) = terms.first() else {
                return Err(Error::invalid(format!(
                    "objective `{}` returned no terms",
                    o.name()
                )));
            };
            if o.weight() != 0.0 {
                total += first.value.to_kind(kind) * o.weight();
            }
            for t in &terms {
                let mut name = t.name.clone();
                let mut n = 2;
                while out.iter().any(|(m, _)| *m == name) {
                    name = format!("{}#{n}", t.name);
                    n += 1;
                }
                out.push((name, t.value.double_value(&[])));
            }
        }
        Ok((total, out))
    }

    /// Runs one step: plans, computes the predictions, evaluates every objective and, when
    /// asked, backpropagates `loss_scale * total` into the adapters.
    pub fn run(
        mut self,
        objectives: &[Box<dyn Objective>],
        opts: &StepOptions,
    ) -> Result<StepResult> {
        let requests: Vec<PredictionRequest> =
            objectives.iter().flat_map(|o| o.requests()).collect();
        self.plan(&requests);
        let Some(scale) = opts.backward else {
            let _guard = tch::no_grad_guard();
            self.compute(opts.pairs_per_forward, false)?;
            let (total, terms) = self.terms(objectives)?;
            return Ok(self.result(&total, terms));
        };
        let chunked = self.ranks.is_some()
            || opts.pairs_per_forward.is_some_and(|p| {
                self.groups
                    .iter()
                    .any(|((_, g), grp)| *g && grp.mask.iter().filter(|m| **m).count() as i64 > p)
            });
        if !chunked {
            self.compute(None, true)?;
            let (total, terms) = self.terms(objectives)?;
            if total.requires_grad() {
                (&total * scale).f_backward()?;
            }
            return Ok(self.result(&total, terms));
        }
        // Pass 1: no graph through the backbone; dL/dpred on leaf predictions.
        self.compute(opts.pairs_per_forward, false)?;
        let mut leaves = Vec::new();
        for ((_, grad), g) in self.groups.iter_mut() {
            if *grad {
                let leaf = g
                    .preds
                    .take()
                    .expect("computed")
                    .detach()
                    .set_requires_grad(true);
                g.preds = Some(leaf.shallow_clone());
                leaves.push(leaf);
            }
        }
        let (total, terms) = self.terms(objectives)?;
        if !total.requires_grad() {
            return Ok(self.result(&total, terms));
        }
        let grads = Tensor::f_run_backward(&[&total * scale], &leaves, false, false)?;
        // Pass 2: each chunk again with a graph, fed its cached dL/dpred.
        let keys: Vec<TokenSelection> = self
            .groups
            .keys()
            .filter(|(_, g)| *g)
            .map(|(s, _)| s.clone())
            .collect();
        for (sel, grad) in keys.iter().zip(grads) {
            let flat = grad.reshape([self.b * self.b, -1]);
            let pairs = self.share(self.pair_indices(&self.groups[&(sel.clone(), true)].mask));
            for chunk in self.chunks(&pairs, opts.pairs_per_forward) {
                let p = self.forward_pairs(sel, &chunk)?;
                let idx = Tensor::from_slice(&chunk).to_device(flat.device());
                let g = flat.index_select(0, &idx).reshape(p.size());
                if p.requires_grad() {
                    (&p * g).sum(p.kind()).f_backward()?;
                }
            }
        }
        Ok(self.result(&total, terms))
    }

    fn result(&self, total: &Tensor, terms: Vec<(String, f64)>) -> StepResult {
        StepResult {
            terms,
            total: total.double_value(&[]),
            forwards: self.forwards.get(),
        }
    }
}

impl StepView for StepContext<'_> {
    fn images(&self) -> i64 {
        self.b
    }
    fn x0(&self) -> &Tensor {
        &self.x0
    }
    fn noise(&self) -> &Tensor {
        &self.noise
    }
    fn timestep(&self) -> &Tensor {
        &self.t
    }
    fn target(&self) -> &Tensor {
        &self.target
    }
    fn predictions(&self, tokens: &TokenSelection, grad: bool) -> Result<Tensor> {
        let key = self.key(tokens, grad);
        match self.groups.get(&key).and_then(|g| g.preds.as_ref()) {
            Some(p) => Ok(p.shallow_clone()),
            None => Err(Error::invalid(format!(
                "no predictions for token set {:?} (ema: {}, grad: {grad}): the objective \
                 must list them in `requests()`",
                tokens.set.as_deref().unwrap_or("<first>"),
                tokens.ema
            ))),
        }
    }
    fn x_t(&self) -> &Tensor {
        &self.x_t
    }
    fn captions(&self) -> Option<&[String]> {
        self.captions.as_deref()
    }
    fn predicted_x0(&self, tokens: &TokenSelection, grad: bool, images: &[i64]) -> Result<Tensor> {
        let preds = self.predictions(tokens, grad)?;
        let dev = self.x0.device();
        if let Some(i) = images.iter().find(|&&i| !(0..self.b).contains(&i)) {
            return Err(Error::invalid(format!(
                "image {i} of a step of {} images",
                self.b
            )));
        }
        let idx = Tensor::from_slice(images).to_device(dev);
        // Pair (i, i) is row i * (B + 1) of the flattened (B, B, ...) predictions.
        let pred = preds.flatten(0, 1).index_select(0, &(&idx * (self.b + 1)));
        let x_t = self.x_t.index_select(0, &idx);
        let t = self.t.index_select(0, &idx);
        Ok(self.backbone.noise().predicted_x0(&x_t, &pred, &t))
    }
    fn decode(&self, samples: &Tensor) -> Result<Tensor> {
        self.backbone.decode(samples)
    }
    fn preference_pairs(&self) -> bool {
        self.preference_pairs
    }
}

/// Preference pairs (image i and i + B/2) must be noised alike, or the loss compares the
/// two images at different noise levels instead of the model's preference.
fn check_pairs_share_t_and_noise(b: i64, t: &Tensor, noise: &Tensor) -> Result<()> {
    if b % 2 != 0 {
        return Err(Error::invalid(format!(
            "a batch of preference pairs holds an even number of images, not {b}"
        )));
    }
    let n = b / 2;
    let same = |x: &Tensor| x.narrow(0, 0, n).equal(&x.narrow(0, n, n));
    if !same(t) || !same(noise) {
        return Err(Error::invalid(
            "preference pairs: the preferred and rejected image of a pair must share their \
             timestep and noise",
        ));
    }
    Ok(())
}
