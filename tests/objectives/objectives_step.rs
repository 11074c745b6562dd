//! The step context's sharing, the contrastive gradient against finite differences, and short
//! training runs in which each objective lowers its own loss (logged to metrics.jsonl).

use std::io::Write;

use crate::objectives_common as common;
use softalign_core::adapter::Adapter;
use softalign_core::objective::Objective;
use softalign_core::plugin::ObjectiveSpec;
use softalign_core::train::{MicroStep, TrainConfig, TrainTask};
use softalign_objectives::{evaluate, ObjectiveTask, StepOptions};
use tch::{Kind, Tensor};

fn objectives(toml_src: &str) -> Vec<Box<dyn Objective>> {
    #[derive(serde::Deserialize)]
    struct List {
        objective: Vec<Box<dyn ObjectiveSpec>>,
    }
    let list: List = toml::from_str(toml_src).unwrap();
    list.objective.iter().map(|s| s.build().unwrap()).collect()
}

const CONTRASTIVE: &str =
    "[[objective]]\ntype = \"softrepa_contrastive\"\nscale = 1.0\ntemperature = 0.5\n";
const TRAIN_CONTRASTIVE: &str =
    "[[objective]]\ntype = \"softrepa_contrastive\"\nscale = 4.0\ntemperature = 1.0\n";
const DSM: &str = "[[objective]]\ntype = \"dsm\"\nweight = 10.0\n";
const AGSM: &str = "[[objective]]\ntype = \"agsm\"\ngamma_minus = 0.1\n";

#[test]
fn shared_predictions_are_computed_once() {
    let dir = common::python_fixture();
    let toy = common::Toy::load(&dir.path().join("toy.safetensors"), Kind::Float).unwrap();
    let adapters: Vec<Box<dyn Adapter>> = vec![common::adapter(None)];
    let batch = dir.path().join("batch_4.safetensors");
    let count = |src: &str, chunk: Option<i64>, backward: bool| {
        let opts = StepOptions {
            pairs_per_forward: chunk,
            backward: backward.then_some(1.0),
        };
        evaluate(
            &toy,
            Some(&adapters),
            &objectives(src),
            common::read_batch(&batch),
            &opts,
        )
        .unwrap()
        .forwards
    };
    let both = format!("{CONTRASTIVE}{DSM}");
    for (chunk, backward) in [
        (None, false),
        (None, true),
        (Some(5), false),
        (Some(5), true),
    ] {
        let alone = count(CONTRASTIVE, chunk, backward);
        let with_dsm = count(&both, chunk, backward);
        eprintln!("chunk {chunk:?} backward {backward}: contrastive {alone} forwards, contrastive+dsm {with_dsm}");
        assert_eq!(alone, with_dsm, "dsm must reuse the contrastive's diagonal");
    }
    // 16 pairs in chunks of 5: 4 forwards; a chunked backward re-runs them with a graph.
    assert_eq!(count(CONTRASTIVE, None, true), 1);
    assert_eq!(count(CONTRASTIVE, Some(5), false), 4);
    assert_eq!(count(CONTRASTIVE, Some(5), true), 8);
    // AGSM: online psi+ (diagonal), online psi- (off-diagonal), EMA psi+, EMA psi-.
    assert_eq!(count(AGSM, None, true), 4);
    assert_eq!(
        count(&format!("{AGSM}{DSM}"), None, true),
        4,
        "dsm reads the first set (psi+) online on the diagonal, which AGSM already computes"
    );
}

#[test]
fn contrastive_gradient_matches_finite_differences() {
    let dir = common::python_fixture();
    // The model runs in f64 (the fp32 tokens are cast on entry) so the differences are clean.
    let toy = common::Toy::load(&dir.path().join("toy.safetensors"), Kind::Double).unwrap();
    let adapters: Vec<Box<dyn Adapter>> = vec![common::adapter(Some(
        &dir.path().join("adapter.safetensors"),
    ))];
    let batch = dir.path().join("batch_3.safetensors");
    let objs = objectives(CONTRASTIVE);
    let batch64 = || {
        let mut b = common::read_batch(&batch);
        b.x0 = b.x0.to_kind(Kind::Double);
        b.noise = b.noise.to_kind(Kind::Double);
        b
    };
    let loss = || {
        evaluate(
            &toy,
            Some(&adapters),
            &objs,
            batch64(),
            &StepOptions::default(),
        )
        .unwrap()
        .total
    };
    let opts = StepOptions {
        pairs_per_forward: Some(4),
        backward: Some(1.0),
    };
    evaluate(&toy, Some(&adapters), &objs, batch64(), &opts).unwrap();
    let params = adapters[0].trainable();
    let mut worst: f64 = 0.0;
    let mut checked = Vec::new();
    for (name, p) in &params {
        let grad = p.grad();
        if !grad.defined() {
            // The contrastive loss reads the first set (positive) only.
            assert_eq!(name, "negative.tokens");
            continue;
        }
        checked.push(name.clone());
        let grad = grad.copy();
        let flat = p.view([-1]);
        let n = flat.size()[0];
        // A handful of coordinates spread over the tensor; the time table only has one live row.
        let picks: Vec<i64> = if name == "time_table" {
            let g = grad.view([-1]).abs();
            let top = g.argsort(0, true).narrow(0, 0, 4);
            Vec::<i64>::try_from(top).unwrap()
        } else {
            vec![0, n / 3, n / 2, n - 1]
        };
        for k in picks {
            let orig = flat.double_value(&[k]);
            let eps = 1e-3;
            let set = |v: f64| {
                let _guard = tch::no_grad_guard();
                let _ = flat.get(k).fill_(v);
                flat.double_value(&[k])
            };
            let hi = set(orig + eps);
            let lp = loss();
            let lo = set(orig - eps);
            let lm = loss();
            set(orig);
            let fd = (lp - lm) / (hi - lo);
            let an = grad.view([-1]).double_value(&[k]);
            let rel = (fd - an).abs() / an.abs().max(1e-6);
            eprintln!("{name}[{k}]: analytic {an:.6e}  central FD {fd:.6e}  rel diff {rel:.2e}");
            assert!(
                an.abs() > 1e-7,
                "{name}[{k}]: gradient too small to check ({an:e})"
            );
            assert!(
                rel < 1e-4,
                "{name}[{k}]: analytic {an} vs finite difference {fd}"
            );
            worst = worst.max(rel);
        }
    }
    assert_eq!(checked, ["positive.tokens", "time_table"]);
    eprintln!("worst relative difference {worst:.2e}");
}

fn train_config(b: i64) -> TrainConfig {
    toml::from_str(&format!("steps = 24\nlr = 0.03\nimages_per_step = {b}\n")).unwrap()
}

/// Adam on the task's parameters (the trainer proper lives in core/src/train).
fn adam_step(params: &[(String, Tensor)], state: &mut Vec<(Tensor, Tensor)>, step: i64, lr: f64) {
    let _guard = tch::no_grad_guard();
    if state.is_empty() {
        *state = params
            .iter()
            .map(|(_, p)| (p.zeros_like(), p.zeros_like()))
            .collect();
    }
    for ((_, p), (m, v)) in params.iter().zip(state.iter_mut()) {
        let mut p = p.shallow_clone();
        let g = p.grad();
        if !g.defined() {
            continue;
        }
        *m = &*m * 0.9 + &g * 0.1;
        *v = &*v * 0.999 + g.square() * 0.001;
        let mh = &*m / (1.0 - 0.9f64.powi(step as i32));
        let vh = &*v / (1.0 - 0.999f64.powi(step as i32));
        let _ = p.g_sub_(&(mh / (vh.sqrt() + 1e-8) * lr));
        p.zero_grad();
    }
}

#[test]
fn short_training_lowers_each_objective() {
    let dir = common::python_fixture();
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("objectives_training");
    std::fs::create_dir_all(&out).unwrap();
    for (label, src, term) in [
        ("contrastive", TRAIN_CONTRASTIVE, "softrepa_contrastive"),
        ("dsm", DSM, "dsm"),
        ("agsm", AGSM, "agsm"),
    ] {
        tch::manual_seed(7);
        let n = 6;
        let data = common::MemDataset {
            x0: Tensor::randn([n, 4, 4, 4], (Kind::Float, tch::Device::Cpu)) * 0.5,
            ehs: Tensor::randn([n, 5, common::DC], (Kind::Float, tch::Device::Cpu)),
            pooled: Tensor::randn([n, 8], (Kind::Float, tch::Device::Cpu)),
        };
        let toy = common::Toy::load(&dir.path().join("toy.safetensors"), Kind::Float).unwrap();
        let mut task = ObjectiveTask::new(
            Box::new(toy),
            vec![common::adapter(None)],
            objectives(src),
            Box::new(data),
            train_config(3),
        )
        .unwrap();
        let params = task.parameters();
        let mut adam = Vec::new();
        let path = out.join(format!("{label}-metrics.jsonl"));
        let mut log = std::fs::File::create(&path).unwrap();
        let mut own = Vec::new();
        for step in 0..24u64 {
            tch::manual_seed(1000 + (step % 4) as i64);
            let m = task
                .micro_step(&MicroStep {
                    step,
                    micro: 0,
                    loss_scale: 1.0,
                })
                .unwrap();
            adam_step(&params, &mut adam, step as i64 + 1, 0.03);
            task.after_step(step).unwrap();
            let mut rec = serde_json::Map::new();
            rec.insert("step".into(), serde_json::json!(step));
            for (k, v) in &m {
                rec.insert(k.clone(), serde_json::json!(v));
            }
            writeln!(log, "{}", serde_json::Value::Object(rec)).unwrap();
            own.push(m[term]);
        }
        // The draws cycle over 4 seeds, so compare the same 4 steps at the start and the end.
        let first: f64 = own[..4].iter().sum::<f64>() / 4.0;
        let last: f64 = own[20..].iter().sum::<f64>() / 4.0;
        eprintln!(
            "{label}: {term} first 4 steps {first:.5}, last 4 steps {last:.5} ({})",
            path.display()
        );
        assert!(
            last < first,
            "{label}: {term} did not go down ({first} -> {last})"
        );
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(lines, 24);
        task.export(&out.join(label), 24).unwrap();
        assert!(out.join(label).join("adapter.safetensors").is_file());
    }
}
