//! Each objective against the straightforward Python reference (one forward per pair) on the
//! same tiny checkpoint and batch files: every term, the weighted total and the gradients
//! w.r.t. the adapter's tensors, for B = 2, 3, 4, chunked and unchunked forwards.

use std::collections::BTreeMap;

use crate::objectives_common as common;
use softalign_core::adapter::Adapter;
use softalign_core::objective::Objective;
use softalign_core::plugin::ObjectiveSpec;
use softalign_core::tensors::MappedSafetensors;
use softalign_objectives::{evaluate, StepOptions};
use tch::{Kind, Tensor};

const TOL: f64 = 1e-5;

fn objectives(config: &str) -> Vec<Box<dyn Objective>> {
    let toml_src = match config {
        "contrastive_default" => "[[objective]]\ntype = \"softrepa_contrastive\"\n",
        "contrastive_t2i" => {
            "[[objective]]\ntype = \"softrepa_contrastive\"\nscale = 1.0\ntemperature = 0.5\n\
             direction = \"text_to_image\"\n"
        }
        "contrastive_both_schedule" => {
            "[[objective]]\ntype = \"softrepa_contrastive\"\nscale = 2.0\n\
             temperature_schedule = [[0.0, 0.2], [1000.0, 1.0]]\ndirection = \"both\"\n"
        }
        "contrastive_dsm" => {
            "[[objective]]\ntype = \"softrepa_contrastive\"\ntemperature = 0.3\n\
             [[objective]]\ntype = \"dsm\"\nweight = 10.0\n"
        }
        "agsm" => "[[objective]]\ntype = \"agsm\"\n",
        "agsm_no_negative" => {
            "[[objective]]\ntype = \"agsm\"\nweight = 0.5\ngamma_plus = 2.0\ngamma_minus = 0.0\n\
             tau = 0.3\n"
        }
        other => panic!("unknown config {other}"),
    };
    #[derive(serde::Deserialize)]
    struct List {
        objective: Vec<Box<dyn ObjectiveSpec>>,
    }
    let list: List = toml::from_str(toml_src).unwrap();
    list.objective.iter().map(|s| s.build().unwrap()).collect()
}

const CONFIGS: [&str; 6] = [
    "contrastive_default",
    "contrastive_t2i",
    "contrastive_both_schedule",
    "contrastive_dsm",
    "agsm",
    "agsm_no_negative",
];

#[test]
fn objectives_match_the_python_reference() {
    let dir = common::python_fixture();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("expected.json")).unwrap())
            .unwrap();
    let ref_grads = MappedSafetensors::open(dir.path().join("grads.safetensors"))
        .unwrap()
        .all()
        .unwrap();
    let toy = common::Toy::load(&dir.path().join("toy.safetensors"), Kind::Float).unwrap();
    let adapters: Vec<Box<dyn Adapter>> = vec![common::adapter(Some(
        &dir.path().join("adapter.safetensors"),
    ))];
    // (config, B, chunked) -> (max term diff, max grad diff)
    let mut report: BTreeMap<(String, i64, bool), (f64, f64)> = BTreeMap::new();
    for b in [2i64, 3, 4] {
        let batch = dir.path().join(format!("batch_{b}.safetensors"));
        for config in CONFIGS {
            let objs = objectives(config);
            for chunk in [None, Some(3)] {
                for mode in ["adapter", "bare"] {
                    let want = &expected[config][b.to_string()][mode];
                    let ad = (mode == "adapter").then_some(adapters.as_slice());
                    // With backward: values and gradients in one step (the trainer's path).
                    for (_, mut p) in adapters[0].trainable() {
                        p.zero_grad();
                    }
                    let opts = StepOptions {
                        pairs_per_forward: chunk,
                        backward: (mode == "adapter").then_some(1.0),
                    };
                    let got = evaluate(&toy, ad, &objs, common::read_batch(&batch), &opts)
                        .unwrap_or_else(|e| panic!("{config} B={b}: {e}"));
                    let mut max_term: f64 = 0.0;
                    let mut seen = 0;
                    for (name, v) in got
                        .terms
                        .iter()
                        .chain([("total".to_string(), got.total)].iter())
                    {
                        let Some(w) = want.get(name) else { continue };
                        let d = (v - w.as_f64().unwrap()).abs();
                        assert!(
                            d < TOL,
                            "{config} B={b} chunk={chunk:?} {mode}: {name} = {v}, reference {w} (diff {d:e})"
                        );
                        max_term = max_term.max(d);
                        seen += 1;
                    }
                    assert_eq!(
                        seen,
                        want.as_object().unwrap().len(),
                        "{config}: every reference term must be reported ({:?})",
                        got.terms
                    );
                    let mut max_grad: f64 = 0.0;
                    if mode == "adapter" {
                        for (name, p) in adapters[0].trainable() {
                            let r = &ref_grads[&format!("{config}/B{b}/{name}")];
                            let g = p.grad();
                            let g = if g.defined() { g } else { r.zeros_like() };
                            let d = (&g - r).abs().max().double_value(&[]);
                            let scale = r.abs().max().double_value(&[]).max(1.0);
                            assert!(
                                d < TOL * scale,
                                "{config} B={b} chunk={chunk:?}: grad of {name} differs by {d:e}"
                            );
                            max_grad = max_grad.max(d);
                        }
                        let e = report
                            .entry((config.into(), b, chunk.is_some()))
                            .or_default();
                        e.1 = e.1.max(max_grad);
                    }
                    let e = report
                        .entry((config.into(), b, chunk.is_some()))
                        .or_default();
                    e.0 = e.0.max(max_term);
                }
            }
        }
    }
    for ((c, b, ch), (t, g)) in &report {
        eprintln!(
            "{c:28} B={b} {:9} max|term diff| {t:.2e}  max|grad diff| {g:.2e}",
            if *ch { "chunked" } else { "unchunked" }
        );
    }
    // A meaningful gradient: the reference's must not be all zeros.
    let g = &ref_grads["contrastive_t2i/B4/positive.tokens"];
    assert!(g.abs().max().double_value(&[]) > 1e-6);
    let _ = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
}
