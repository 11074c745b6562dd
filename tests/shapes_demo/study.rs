//! `softalign study` end to end at toy size: a tiny base, three arms (the base, SoftREPA and
//! AGSM recipes) with two training seeds of 2 steps, one prompt per category; the report's
//! tables and chart, and a second invocation that reuses every result instead of redoing it.
use crate::common::{s, softalign, tiny_model};

#[test]
fn study_trains_every_seed_reports_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_model(tmp.path());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let recipe = |f: &str| toml::Value::String(root.join(f).display().to_string()).to_string();
    let study = tmp.path().join("toy.toml");
    std::fs::write(
        &study,
        format!(
            r#"
name = "toy"
claim = "A toy claim."
base = {base}
reference = "softrepa"
set = ["train.images_per_step=2", "data.n=16"]

[[arm]]
name = "base"

[[arm]]
name = "softrepa"
recipe = {softrepa}

[[arm]]
name = "agsm"
recipe = {agsm}
"#,
            base = toml::Value::String(s(&base).to_string()),
            softrepa = recipe("recipes/shapes/softrepa.toml"),
            agsm = recipe("recipes/shapes/agsm.toml"),
        ),
    )
    .unwrap();
    let out = tmp.path().join("study");
    let args = [
        "study",
        s(&study),
        "--out",
        s(&out),
        "--seeds",
        "2",
        "--train-steps",
        "2",
        "--n",
        "1",
        "--per-tag",
        "1",
        "--steps",
        "2",
        "--quiet",
    ];
    let run = softalign(&args);
    let err = String::from_utf8_lossy(&run.stderr);
    for arm in ["softrepa", "agsm"] {
        for seed in 0..2 {
            let d = out.join(format!("{arm}/seed-{seed}"));
            assert!(d.join("train/final/adapter.safetensors").is_file(), "{d:?}");
            assert!(d.join("eval/results.jsonl").is_file(), "{d:?}");
            let rec: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(d.join("train/recipe.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(rec["seed"], seed, "training seed {seed} recorded");
        }
    }
    assert!(out.join("base/eval/results.jsonl").is_file());
    assert!(out.join("chart.png").is_file());
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for want in [
        "**Claim.** A toy claim.",
        "| softrepa | 2 |",
        "| agsm | 2 |",
        "| base | 1 |",
        "## Against `softrepa`",
        "softalign train --recipe",
    ] {
        assert!(report.contains(want), "report lacks `{want}`:\n{report}");
    }
    assert_eq!(err.matches(": training ").count(), 4, "{err}");

    // Again: everything is reused, nothing trained or sampled.
    let again = softalign(&args);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!err.contains(": training "), "{err}");
    let report2 = std::fs::read_to_string(out.join("report.md")).unwrap();
    let table = |r: &str| r.split("## Settings").next().unwrap().to_string();
    assert_eq!(
        table(&report),
        table(&report2),
        "the same numbers from the reused results"
    );
}
