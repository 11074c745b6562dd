//! `softalign demo` end to end at toy size: a tiny base (2 pretraining steps), 2 training steps per recipe
//! through the shipped shapes recipes, one prompt per category, 2 sampling steps. Checks the
//! run folder (three evaluations on the same noise, adapters, grids, report) and the table.
use crate::common::{pretrained, s, softalign, tiny_model};
use softalign_worlds::geneval::{read_geneval_folder, read_results_jsonl, Summary};

#[test]
fn demo_trains_evaluates_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_model(tmp.path());
    let out = tmp.path().join("demo");
    let run = softalign(&[
        "demo",
        "--base",
        s(&base),
        "--train-steps",
        "2",
        "--set",
        "train.images_per_step=2",
        "--set",
        "data.n=16",
        "--per-tag",
        "1",
        "--n",
        "2",
        "--steps",
        "2",
        "--quiet",
        "--out",
        s(&out),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);

    for name in ["softrepa", "agsm"] {
        let adapter = out.join(format!("train-{name}/final/adapter.safetensors"));
        assert!(adapter.is_file(), "{adapter:?} missing");
        let metrics = std::fs::read_to_string(out.join(format!("train-{name}/metrics.jsonl")));
        assert!(
            metrics.unwrap().contains("\"step\":2"),
            "{name}: no step 2 logged"
        );
    }
    let mut summaries = Vec::new();
    for name in ["base", "softrepa", "agsm"] {
        let dir = out.join(format!("eval-{name}"));
        let folders = read_geneval_folder(&dir).unwrap();
        assert_eq!(folders.len(), 6, "{name}: one prompt per category");
        assert!(folders.iter().all(|f| f.samples.len() == 2));
        let results = read_results_jsonl(&dir.join("results.jsonl")).unwrap();
        let summary = Summary::from_results(&results);
        summaries.push(summary);
    }
    // The adapters act: some image differs from the base's on the same noise.
    let samples = |m: &str| -> Vec<Vec<u8>> {
        read_geneval_folder(&out.join(format!("eval-{m}")))
            .unwrap()
            .iter()
            .flat_map(|f| f.samples.iter().map(|p| std::fs::read(p).unwrap()))
            .collect()
    };
    let base_samples = samples("base");
    for m in ["softrepa", "agsm"] {
        assert!(
            samples(m) != base_samples,
            "{m}: every image equals the base's"
        );
    }

    let base_results = read_results_jsonl(&out.join("eval-base/results.jsonl")).unwrap();
    for m in ["softrepa", "agsm"] {
        let other = read_results_jsonl(&out.join(format!("eval-{m}/results.jsonl"))).unwrap();
        // One row per image the recipe fixed or broke (at most 16 each here), then one
        // unchanged image per category that has one; rows are 102 px tiles (32 px x 3 in a
        // 3 px frame) under a header, 6 px apart.
        let (mut changed, mut unchanged) = (0, std::collections::BTreeSet::new());
        for (b, o) in base_results.iter().zip(&other) {
            if b.correct != o.correct {
                changed += 1;
            } else {
                unchanged.insert(b.tag);
            }
        }
        let rows = changed + unchanged.len();
        let g = image::open(out.join(format!("grid-base-vs-{m}.png")))
            .unwrap()
            .to_rgb8();
        assert_eq!(g.height() as usize, 30 + rows * 108, "grid-base-vs-{m}.png");
        assert!(g.width() > 2 * 102, "grid-base-vs-{m}.png");
    }
    for m in ["base", "softrepa", "agsm"] {
        assert!(
            out.join(format!("eval-{m}/grid.png")).is_file(),
            "eval-{m}/grid.png"
        );
    }

    let table = std::fs::read_to_string(out.join("table.txt")).unwrap();
    assert!(
        stdout.contains(&table),
        "printed table differs from table.txt:\n{stdout}"
    );
    let header = table.lines().next().unwrap();
    for col in ["category", "base", "+SoftREPA", "+AGSM"] {
        assert!(header.contains(col), "{header}");
    }
    let overall = table.lines().find(|l| l.starts_with("overall")).unwrap();
    for s in &summaries {
        let c = format!("{:.1}% [", 100.0 * s.overall);
        assert!(overall.contains(&c), "{overall} lacks {c}");
    }
    assert!(
        stdout.contains("+SoftREPA: ") && stdout.contains(" of 12 images, p = "),
        "{stdout}"
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "## Results",
        "| category | n | base | +SoftREPA | +AGSM |",
        "SoftREPA training: recipes/shapes/softrepa.toml with 2 steps",
        "AGSM training: recipes/shapes/agsm.toml with 2 steps",
        "| train SoftREPA (2 steps) |",
        "| total |",
        "grid-base-vs-agsm.png",
        "## Paired against the base",
        "| +AGSM vs base | images |",
        "| **all** | 12 |",
    ] {
        assert!(
            report.contains(needle),
            "report.md lacks {needle:?}:\n{report}"
        );
    }
    // A second run into the same folder is refused rather than mixing results.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(["demo", "--base", s(&base), "--out", s(&out)])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(!again.status.success());
}

/// The same demo on a UNet base: the UNet recipes are chosen from the base's folder, sampling
/// is DDIM from the folder's scheduler config, and tokens trained at `down` change images.
#[test]
fn demo_runs_on_a_unet_base() {
    let tmp = tempfile::tempdir().unwrap();
    let base = pretrained(tmp.path(), "recipes/shapes/pretrain-unet.toml");
    assert!(base.join("unet/config.json").is_file());
    let out = tmp.path().join("demo");
    let done = softalign(&[
        "demo",
        "--base",
        s(&base),
        "--train-steps",
        "2",
        "--set",
        "train.images_per_step=2",
        "--set",
        "data.n=16",
        "--per-tag",
        "1",
        "--n",
        "1",
        "--steps",
        "2",
        "--quiet",
        "--out",
        s(&out),
    ]);
    assert!(done.status.success());
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "recipes/shapes/unet-softrepa.toml with 2 steps",
        "recipes/shapes/unet-agsm.toml with 2 steps",
        "DDIM 2 steps",
    ] {
        assert!(
            report.contains(needle),
            "report.md lacks {needle:?}:\n{report}"
        );
    }
    for m in ["softrepa", "agsm"] {
        assert!(out
            .join(format!("train-{m}/final/adapter.safetensors"))
            .is_file());
    }
}
