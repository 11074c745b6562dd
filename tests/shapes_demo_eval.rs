//! `softalign eval` on a tiny shapes model: GenEval's folder layout, one results line
//! per image, and a summary whose counts, accuracies and overall score follow from
//! results.jsonl.
mod shapes_demo_common;

use std::collections::BTreeMap;

use shapes_demo_common::{s, softalign, tiny_model};
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
