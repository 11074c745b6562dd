//! The trainer's schedules and AdamW against torch's own (tests/python/trainer_reference.py).
//! Fails when Python or torch is missing.
use std::collections::BTreeMap;
use std::path::Path;

use softalign_core::tensors::MappedSafetensors;
use softalign_core::train::config::Schedule;
use softalign_core::train::optim::{clip_grads, global_grad_norm, AdamW, GroupSettings};
use softalign_core::train::LrSchedule;
use tch::{Kind, Tensor};

fn reference(dir: &Path) {
    let python = std::env::var("SOFTALIGN_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/trainer_reference.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn schedules_and_adamw_match_torch() {
    let dir = tempfile::tempdir().unwrap();
    reference(dir.path());

    // Schedules, stepped once per step: torch's closed forms are the same double arithmetic.
    let sched = json(&dir.path().join("schedules.json"));
    let cases = [
        (
            "warm_restarts_t0_3_tmult_1",
            Schedule::WarmRestarts {
                t_0: 3,
                t_mult: 1,
                eta_min: 1e-5,
                every: 1,
            },
            1e-3,
            40,
        ),
        (
            "warm_restarts_t0_2_tmult_2",
            Schedule::WarmRestarts {
                t_0: 2,
                t_mult: 2,
                eta_min: 0.01,
                every: 1,
            },
            0.5,
            64,
        ),
        (
            "warm_restarts_t0_1_tmult_3",
            Schedule::WarmRestarts {
                t_0: 1,
                t_mult: 3,
                eta_min: 0.0,
                every: 1,
            },
            2.0,
            50,
        ),
        (
            "cosine_tmax_20",
            Schedule::Cosine { eta_min: 1e-4 },
            1e-2,
            20,
        ),
    ];
    let mut worst = 0.0f64;
    for (key, schedule, base, steps) in cases {
        let want: Vec<f64> = sched[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().parse::<f64>().unwrap())
            .collect();
        assert_eq!(want.len(), steps as usize);
        let s = LrSchedule::new(schedule, 0, steps);
        for (i, w) in want.iter().enumerate() {
            let got = s.lr(base, i as u64);
            let rel = (got - w).abs() / w.abs().max(1e-12);
            worst = worst.max(rel);
            // CosineAnnealingLR is recursive in torch (rounding drifts); warm restarts are
            // its closed form and must agree to the last bit.
            let tol = if key.starts_with("cosine") {
                1e-12
            } else {
                0.0
            };
            assert!(rel <= tol, "{key} step {i}: ours {got:e}, torch {w:e}");
        }
    }
    eprintln!("schedules: worst relative error {worst:e}");

    // AdamW + clip_grad_norm_ + warm restarts, two parameter groups.
    let meta = json(&dir.path().join("adamw.json"));
    let st = MappedSafetensors::open(dir.path().join("adamw.safetensors")).unwrap();
    let t: BTreeMap<String, Tensor> = st.all().unwrap();
    let names: Vec<String> = meta["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let params: Vec<(String, Tensor)> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                t[&format!("init/{n}")].copy().set_requires_grad(true),
            )
        })
        .collect();
    let groups = vec![
        GroupSettings {
            pattern: None,
            lr: 1e-2,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 1e-4,
        },
        GroupSettings {
            pattern: Some("time*".into()),
            lr: 3e-2,
            betas: [0.8, 0.99],
            eps: 1e-8,
            weight_decay: 0.1,
        },
    ];
    let assigned = params
        .iter()
        .map(|(n, p)| (n.clone(), p.shallow_clone(), usize::from(n == "time_table")))
        .collect();
    let mut opt = AdamW::new(groups.clone(), assigned).unwrap();
    let schedule = LrSchedule::new(
        Schedule::WarmRestarts {
            t_0: 2,
            t_mult: 2,
            eta_min: 1e-3,
            every: 1,
        },
        0,
        100,
    );
    let steps = meta["steps"].as_u64().unwrap();
    for s in 0..steps {
        for (n, p) in &params {
            // The gradient of sum(p * g) is exactly g.
            (p * &t[&format!("grad/{s}/{n}")])
                .sum(Kind::Float)
                .backward();
        }
        let (total, norm) = global_grad_norm(&params).unwrap();
        let want_norm = meta["grad_norms"][s as usize].as_f64().unwrap();
        assert!(
            (norm - want_norm).abs() <= 1e-6 * want_norm,
            "step {s}: grad norm {norm} vs {want_norm}"
        );
        clip_grads(&params, &total.unwrap(), 1.0).unwrap();
        let lrs: Vec<f64> = groups.iter().map(|g| schedule.lr(g.lr, s)).collect();
        for (gi, lr) in lrs.iter().enumerate() {
            let want: f64 = meta["lrs"][s as usize][gi]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(*lr, want, "lr step {s} group {gi}");
        }
        opt.step(&lrs).unwrap();
        for (_, p) in &params {
            p.shallow_clone().zero_grad();
        }
    }
    let state: BTreeMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    let mut worst = 0.0f64;
    for n in &names {
        for (ours, theirs) in [
            (
                params.iter().find(|(m, _)| m == n).unwrap().1.detach(),
                t[&format!("final/{n}")].shallow_clone(),
            ),
            (
                state[&format!("exp_avg/{n}")].shallow_clone(),
                t[&format!("exp_avg/{n}")].shallow_clone(),
            ),
            (
                state[&format!("exp_avg_sq/{n}")].shallow_clone(),
                t[&format!("exp_avg_sq/{n}")].shallow_clone(),
            ),
        ] {
            let err = (&ours - &theirs).abs().max().double_value(&[]);
            let scale = theirs.abs().max().double_value(&[]);
            worst = worst.max(err / scale);
        }
        assert_eq!(state[&format!("step/{n}")].int64_value(&[]), steps as i64);
    }
    eprintln!("AdamW after {steps} steps vs torch: worst max-abs error / max-abs value {worst:e}");
    assert!(worst < 1e-6, "AdamW differs from torch by {worst:e}");
}
