//! `softalign eval` on a tiny shapes model: GenEval's folder layout, one results line
//! per image, and a summary whose counts, accuracies and overall score follow from
//! results.jsonl.
use std::collections::BTreeMap;

use crate::common::{s, softalign, tiny_model};
use softalign_worlds::geneval::{
    read_geneval_folder, read_metadata_jsonl, read_results_jsonl, wilson_interval, Summary,
};

#[test]
fn eval_writes_geneval_layout_and_a_consistent_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("eval");
    let run = softalign(&[
        "eval",
        "--model",
        s(&model),
        "--per-tag",
        "2",
        "--n",
        "2",
        "--steps",
        "2",
        "--quiet",
        "--out",
        s(&out),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);

    let prompts = read_metadata_jsonl(&out.join("evaluation_metadata.jsonl")).unwrap();
    assert_eq!(prompts, softalign_worlds::shapes::eval_prompts_with(0, 2));
    assert_eq!(prompts.len(), 12, "2 prompts in each of the 6 categories");
    let folders = read_geneval_folder(&out).unwrap();
    assert_eq!(folders.len(), prompts.len());
    for (i, f) in folders.iter().enumerate() {
        assert_eq!(f.index, i);
        assert_eq!(f.prompt, prompts[i]);
        let names: Vec<_> = f.samples.iter().map(|p| p.file_name().unwrap()).collect();
        assert_eq!(names, ["0000.png", "0001.png"]);
    }

    let results = read_results_jsonl(&out.join("results.jsonl")).unwrap();
    assert_eq!(results.len(), 24);
    let summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary, Summary::from_results(&results));
    let mut per_tag: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in &results {
        let e = per_tag.entry(r.tag.name().to_string()).or_default();
        e.0 += r.correct as usize;
        e.1 += 1;
    }
    assert_eq!(summary.tags.len(), 6);
    for t in &summary.tags {
        let (k, n) = per_tag[t.tag.name()];
        assert_eq!((t.correct, t.total), (k, n), "{}", t.tag);
        assert_eq!(t.accuracy, k as f64 / n as f64);
        assert_eq!(t.ci95, wilson_interval(k, n));
        assert!(
            stdout.contains(&format!(
                "{:<16} = {:.2}%",
                t.tag.name(),
                100.0 * t.accuracy
            )),
            "{stdout}"
        );
    }
    let mean = summary.tags.iter().map(|t| t.accuracy).sum::<f64>() / 6.0;
    assert!((summary.overall - mean).abs() < 1e-12);
    assert!(
        stdout.contains(&format!("{:.5}", summary.overall)),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("summary.txt")).unwrap(),
        summary.to_text()
    );
}

/// `softalign eval-edit` on a tiny shapes model with tokens: a folder and results per run,
/// a summary whose counts follow from each run's results.jsonl, tokens paired with the base
/// at every setting, and a setting FlowEdit cannot run refused before any editing.
#[test]
fn eval_edit_scores_every_run_and_pairs_tokens_with_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let train = tmp.path().join("tokens");
    softalign(&[
        "train",
        "--recipe",
        "recipes/shapes/softrepa.toml",
        "--set",
        &format!("backbone.path={}", model.display()),
        "--set",
        "train.steps=1",
        "--set",
        "train.images_per_step=2",
        "--quiet",
        "--run-dir",
        s(&train),
    ]);
    let adapter = train.join("final/adapter.safetensors");
    let out = tmp.path().join("edit");
    let args = |out: &std::path::Path, n_max: &'static str| {
        vec![
            "eval-edit".to_string(),
            "--model".into(),
            s(&model).into(),
            "--adapter".into(),
            s(&adapter).into(),
            "--per-kind".into(),
            "1".into(),
            "--steps".into(),
            "4".into(),
            "--n-max".into(),
            n_max.into(),
            "--tar-guidance".into(),
            "2,5".into(),
            "--quiet".into(),
            "--out".into(),
            s(out).into(),
        ]
    };
    let a = args(&out, "2");
    let run = softalign(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let stdout = String::from_utf8_lossy(&run.stdout);

    let summary: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    // "no edit", then base and tokens at 2 target CFG scales.
    assert_eq!(summary.len(), 5, "{summary:?}");
    for r in &summary[1..] {
        let name = r["run"].as_str().unwrap();
        let lines = std::fs::read_to_string(out.join(name).join("results.jsonl")).unwrap();
        let results: Vec<serde_json::Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(results.len(), 4, "{name}: one edit per kind");
        let correct = results
            .iter()
            .filter(|x| x["score"]["target_correct"].as_bool().unwrap())
            .count();
        assert_eq!(
            r["target_correct"].as_u64().unwrap() as usize,
            correct,
            "{name}"
        );
        assert!(out.join(name).join("003.png").is_file(), "{name}");
    }
    // Unedited sources are never right for their target prompts (the tasks need their edit).
    assert_eq!(summary[0]["target_correct"], 0);
    assert!(out.join("grid.png").is_file());
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("Tokens against the base"), "{report}");
    assert_eq!(
        report.matches("| McNemar p |").count() + stdout.matches("| McNemar p |").count(),
        2
    );

    let bad = tmp.path().join("bad");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(args(&bad, "2,5"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--n-max 5"), "{err}");
    assert!(!bad.join("summary.json").exists());
}
