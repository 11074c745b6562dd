//! The timing harness every backbone's bench shares: forward and forward+backward, with and
//! without an adapter, round-robin over the cases, median per case.
use std::time::Instant;

use softalign_core::adapter::lora::{Lora, LoraSpec};
use softalign_core::adapter::soft_tokens::SoftTokensSpec;
use softalign_core::adapter::{Adapter, Injection, TokenSelection};
use softalign_core::backbone::{Backbone, Conditioning};
use softalign_core::plugin::{AdapterSpec, BuildContext};
use softalign_core::site::SiteHook;
use softalign_core::site::{SiteSelector, TokenSpace};
use softalign_core::Result;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone)]
pub struct BenchRow {
    pub case: String,
    pub ms_per_step: f64,
    pub pairs_per_s: f64,
    /// Process peak resident memory (VmHWM) when the report is made, MiB: the high-water mark
    /// of the whole run, not of one case.
    pub host_peak_mib: Option<f64>,
}

/// VmHWM of this process in MiB (Linux).
pub fn host_peak_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn sync(d: Device) {
    if let Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

/// One denoiser step's inputs and the adapter timed against the bare model.
pub struct BenchInputs<'a> {
    pub backbone: &'a dyn Backbone,
    pub x: Tensor,
    pub t: Tensor,
    pub cond: Conditioning,
    pub adapter: Box<dyn Adapter>,
    /// A LoRA timed unmerged (at the linear sites), then merged into the weights.
    pub lora: Option<Lora>,
    pub warmup: usize,
    pub iters: usize,
}

/// The soft tokens the benches time: `tokens` per site at `sites` (joint space, N(0, 0.02)),
/// one token set, an optional time table.
pub fn bench_tokens(
    backbone: &dyn Backbone,
    tokens: i64,
    sites: SiteSelector,
    time_buckets: i64,
    shared_time_row: bool,
) -> Result<Box<dyn Adapter>> {
    let spec = SoftTokensSpec {
        tokens,
        sites,
        time_buckets,
        shared_time_row,
        shared_tokens: false,
        token_space: TokenSpace::Joint,
        init: Default::default(),
        time_init_std: 0.02,
        sets: vec!["default".into()],
        ema: false,
        ema_decay: 0.9999,
        ema_init: Default::default(),
    };
    let ctx = BuildContext {
        device: backbone.device(),
        recipe_dir: ".".into(),
        dtype_override: None,
        empty_prompt: Default::default(),
    };
    spec.build(backbone.info(), &ctx)
}

/// A rank-4 LoRA (alpha 4) on `blocks` with the component's default targets, B random so
/// the merge changes the weights.
pub fn bench_lora(backbone: &dyn Backbone, blocks: Option<SiteSelector>) -> Result<Lora> {
    let spec = LoraSpec {
        rank: 4,
        alpha: None,
        rslora: false,
        targets: None,
        blocks,
        component: None,
        init: Default::default(),
        dropout: 0.0,
        use_dora: false,
        sets: vec!["default".into()],
        ema: false,
        ema_decay: 0.9999,
    };
    let layout = spec.layout(backbone.info())?;
    let l = Lora::new(&spec, layout, backbone.device());
    let _g = tch::no_grad_guard();
    for (n, mut t) in l.trainable() {
        if n.ends_with("lora_B.weight") {
            t.copy_(&(Tensor::randn(t.size(), (Kind::Float, t.device())) * 0.01));
        }
    }
    Ok(l)
}

/// Cases: (name, hook, backward). Forward alone is a sampling step's denoiser call; fwd+bwd
/// a training step's (gradients to the adapter, or to the input without one).
pub fn time_cases(b: &BenchInputs<'_>, mut report: impl FnMut(&BenchRow)) -> Result<Vec<BenchRow>> {
    let mut rows = time_set(
        b,
        &[
            ("sampling step: forward", None, false),
            ("sampling step: + soft tokens", Some(0), false),
            ("training step: fwd+bwd (to input)", None, true),
            ("training step: + soft tokens", Some(0), true),
        ],
        std::slice::from_ref(&b.adapter),
        &mut report,
    )?;
    if let Some(lora) = &b.lora {
        // The LoRA is only borrowed by the timing; a boxed shallow copy shares its tensors.
        let boxed: Vec<Box<dyn Adapter>> = vec![Box::new(lora.shallow_clone())];
        rows.extend(time_set(
            b,
            &[
                ("sampling step: + LoRA unmerged", Some(0), false),
                ("training step: + LoRA unmerged", Some(0), true),
            ],
            &boxed,
            &mut report,
        )?);
        lora.merge_into(b.backbone.var_store(), "default")?;
        rows.extend(time_set(
            b,
            &[
                ("sampling step: LoRA merged", None, false),
                ("training step: LoRA merged (to input)", None, true),
            ],
            &boxed,
            &mut report,
        )?);
    }
    Ok(rows)
}

fn time_set(
    b: &BenchInputs<'_>,
    cases: &[(&str, Option<usize>, bool)],
    adapters: &[Box<dyn Adapter>],
    mut report: impl FnMut(&BenchRow),
) -> Result<Vec<BenchRow>> {
    let inj = Injection {
        adapters,
        selection: TokenSelection::default(),
    };
    let step = |with: Option<usize>, backward: bool| -> Result<()> {
        let with_tokens = with.is_some();
        let hook = with_tokens.then_some(&inj as &dyn SiteHook);
        if backward {
            // Without an adapter the gradient goes to the input, so the backward is complete.
            let xi = if with_tokens {
                b.x.shallow_clone()
            } else {
                b.x.detach().set_requires_grad(true)
            };
            let out = b.backbone.forward(&xi, &b.t, &b.cond, hook)?;
            out.to_kind(Kind::Float)
                .square()
                .mean(Kind::Float)
                .backward();
        } else {
            let _guard = tch::no_grad_guard();
            let _out = b.backbone.forward(&b.x, &b.t, &b.cond, hook)?;
        }
        Ok(())
    };
    for &(_, tok, bwd) in cases {
        for _ in 0..b.warmup {
            step(tok, bwd)?;
        }
    }
    // Round-robin over the cases so that load from other processes hits them alike; the
    // median of each case's times is reported.
    let dev = b.x.device();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..b.iters {
        for (k, &(_, tok, bwd)) in cases.iter().enumerate() {
            sync(dev);
            let start = Instant::now();
            step(tok, bwd)?;
            sync(dev);
            times[k].push(start.elapsed().as_secs_f64());
        }
    }
    let batch = b.x.size()[0] as f64;
    let mut rows = Vec::new();
    for (k, &(case, _, _)) in cases.iter().enumerate() {
        let v = &mut times[k];
        v.sort_by(f64::total_cmp);
        let secs = v[v.len() / 2];
        let row = BenchRow {
            case: case.into(),
            ms_per_step: secs * 1000.0,
            pairs_per_s: batch / secs,
            host_peak_mib: host_peak_mib(),
        };
        report(&row);
        rows.push(row);
    }
    Ok(rows)
}
