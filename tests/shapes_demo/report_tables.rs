//! The demo's comparison table and report.md, from summaries of known results.
use crate::report::{cell, markdown_table, report_markdown, text_table, Column, ReportInput};
use softalign_worlds::geneval::{wilson_interval, EvalPrompt, ImageResult, Summary, Tag};

/// `k` correct of `n` images of one prompt per tag in `tags`.
fn results(spec: &[(Tag, usize, usize)]) -> Vec<ImageResult> {
    let mut out = Vec::new();
    for &(tag, k, n) in spec {
        let prompt = softalign_worlds::shapes::eval_prompts(0)
            .into_iter()
            .find(|p: &EvalPrompt| p.tag == tag)
            .unwrap();
        for i in 0..n {
            out.push(ImageResult {
                filename: format!("{}/{i}.png", tag.name()),
                tag,
                prompt: prompt.prompt.clone(),
                correct: i < k,
                reason: String::new(),
                metadata: prompt.to_json_line(),
                details: String::new(),
            });
        }
    }
    out
}

#[test]
fn table_rows_cells_and_overall() {
    let base = Summary::from_results(&results(&[
        (Tag::SingleObject, 3, 4),
        (Tag::Counting, 1, 8),
    ]));
    let tokens = Summary::from_results(&results(&[
        (Tag::SingleObject, 4, 4),
        (Tag::Counting, 5, 8),
    ]));
    let cols = [
        Column {
            name: "base",
            summary: &base,
        },
        Column {
            name: "+SoftREPA",
            summary: &tokens,
        },
    ];
    let text = text_table(&cols);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2 + 3, "{text}");
    assert!(
        lines[0].starts_with("category") && lines[0].ends_with("+SoftREPA"),
        "{text}"
    );
    assert!(lines[1].chars().all(|c| c == '-'));
    let single = cell(0.75, wilson_interval(3, 4));
    assert_eq!(
        single,
        format!(
            "75.0% [{:.1}, {:.1}]",
            100.0 * wilson_interval(3, 4)[0],
            100.0 * wilson_interval(3, 4)[1]
        )
    );
    assert!(
        lines[2].starts_with("single_object") && lines[2].contains(&single),
        "{text}"
    );
    assert!(
        lines[2].contains(&cell(1.0, wilson_interval(4, 4))),
        "{text}"
    );
    assert!(
        lines[3].starts_with("counting") && lines[3].contains(&cell(0.125, wilson_interval(1, 8)))
    );
    // Overall: mean of the category accuracies, not of the images.
    assert!(lines[4].starts_with("overall"));
    assert!(
        lines[4].contains(&cell((0.75 + 0.125) / 2.0, base.overall_ci95)),
        "{text}"
    );
    assert!(
        lines[4].contains(&cell((1.0 + 0.625) / 2.0, tokens.overall_ci95)),
        "{text}"
    );
    // Columns line up: every row is as wide as the header's cells allow.
    let ends: Vec<usize> = lines.iter().skip(2).map(|l| l.len()).collect();
    assert!(ends.iter().all(|&e| e == ends[0]), "{text}");

    let md = markdown_table(&cols);
    assert_eq!(md.lines().count(), 2 + 3);
    assert!(
        md.starts_with("| category | n | base | +SoftREPA |\n|---|---:|---:|---:|\n"),
        "{md}"
    );
    assert!(
        md.contains(&format!("| single_object | 4 | {single} |")),
        "{md}"
    );
}

#[test]
fn a_category_missing_from_one_model_shows_a_dash() {
    let a = Summary::from_results(&results(&[(Tag::Colors, 1, 2)]));
    let b = Summary::from_results(&results(&[(Tag::Colors, 2, 2), (Tag::Position, 0, 2)]));
    let cols = [
        Column {
            name: "a",
            summary: &a,
        },
        Column {
            name: "b",
            summary: &b,
        },
    ];
    let md = markdown_table(&cols);
    assert!(md.contains("| position | 2 | - | 0.0% ["), "{md}");
}

#[test]
fn report_holds_table_settings_timings_and_grids() {
    let base = Summary::from_results(&results(&[(Tag::TwoObject, 2, 4)]));
    let cols = [Column {
        name: "base",
        summary: &base,
    }];
    let md = report_markdown(&ReportInput {
        cols: &cols,
        settings: &[("sampling".into(), "4 images per prompt".into())],
        timings: &[("eval base".into(), 12.345)],
        grids: &[(
            "grid-base-vs-agsm.png".into(),
            "Left: base; right: +AGSM".into(),
        )],
        grid_prompts: &["a photo of a circle".into()],
        paired: &[(
            "+AGSM".into(),
            crate::paired::paired(
                &results(&[(Tag::TwoObject, 2, 4)]),
                &results(&[(Tag::TwoObject, 3, 4)]),
            ),
        )],
    });
    for needle in [
        "## What was measured",
        &markdown_table(&cols),
        "- sampling: 4 images per prompt",
        "| eval base | 12.3 |",
        "![Left: base; right: +AGSM](grid-base-vs-agsm.png)",
        "1. a photo of a circle",
        "| two_object | 4 | 1 | 0 | 1.000 |",
    ] {
        assert!(md.contains(needle), "missing {needle:?} in\n{md}");
    }
}

#[test]
fn paired_counts_fixed_and_broken_images_per_category() {
    // Image i of a prompt is correct when i < k: 2 of 4 before, 3 of 4 after (one fixed);
    // counting 3 of 3 before, 0 of 3 after (three broken).
    let before = results(&[(Tag::TwoObject, 2, 4), (Tag::Counting, 3, 3)]);
    let after = results(&[(Tag::TwoObject, 3, 4), (Tag::Counting, 0, 3)]);
    let rows = crate::paired::paired(&before, &after);
    let row = |t: Option<Tag>| rows.iter().find(|r| r.tag == t).unwrap().clone();
    let two = row(Some(Tag::TwoObject));
    assert_eq!((two.pairs, two.gained, two.lost), (4, 1, 0));
    let counting = row(Some(Tag::Counting));
    assert_eq!((counting.pairs, counting.gained, counting.lost), (3, 0, 3));
    assert!((counting.p_value - 0.25).abs() < 1e-12);
    let all = rows.last().unwrap();
    assert_eq!((all.tag, all.pairs, all.gained, all.lost), (None, 7, 1, 3));
    assert!((all.p_value - 0.625).abs() < 1e-12);
}
