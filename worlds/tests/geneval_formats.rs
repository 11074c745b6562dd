//! GenEval's files: metadata lines, the generation folder, results.jsonl and the summary.
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use softalign_worlds::geneval::{
    read_geneval_folder, read_metadata_jsonl, read_results_jsonl, split_held_out,
    write_geneval_folder, write_metadata_jsonl, write_results_jsonl, Summary, Tag,
};
use softalign_worlds::shapes::{
    eval_prompts, eval_prompts_with, render, scene_for_prompt, score_folder, SceneConfig,
};

#[test]
fn metadata_lines_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evaluation_metadata.jsonl");
    let prompts = eval_prompts(0);
    write_metadata_jsonl(&path, &prompts).unwrap();
    assert_eq!(read_metadata_jsonl(&path).unwrap(), prompts);
    let text = std::fs::read_to_string(&path).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["tag"], "single_object");
    assert_eq!(first["include"][0]["class"], "circle");
    assert_eq!(first["include"][0]["count"], 1);
    assert_eq!(first["prompt"], "a photo of a circle");
}

#[test]
fn folder_results_and_summary() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let prompts = eval_prompts_with(3, 5);
    let cfg = SceneConfig::default();
    // Four samples per prompt. Every sample is a correct render, except that for each
    // colours prompt samples 2 and 3 are left blank: colours must score exactly 50%.
    let images: Vec<Vec<image::RgbImage>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (0..4u64)
                .map(|s| {
                    let scene = scene_for_prompt(
                        &mut ChaCha8Rng::seed_from_u64(i as u64 * 10 + s),
                        p,
                        &cfg,
                        0,
                    )
                    .unwrap();
                    if p.tag == Tag::Colors && s >= 2 {
                        image::RgbImage::from_pixel(32, 32, image::Rgb([255, 255, 255]))
                    } else {
                        render(&scene, 32)
                    }
                })
                .collect()
        })
        .collect();
    write_geneval_folder(&root, &prompts, &images).unwrap();
    assert!(root.join("00000/metadata.jsonl").is_file());
    assert!(root.join("00000/samples/0000.png").is_file());
    assert!(root
        .join(format!("{:05}/samples/0003.png", prompts.len() - 1))
        .is_file());
    // What GenEval's walker ignores, ours ignores too.
    image::RgbImage::new(2, 2)
        .save(root.join("00000/grid.png"))
        .unwrap();
    std::fs::write(root.join("00000/samples/notes.txt"), "x").unwrap();
    std::fs::create_dir_all(root.join("logs")).unwrap();

    let folders = read_geneval_folder(&root).unwrap();
    assert_eq!(folders.len(), prompts.len());
    assert_eq!(
        folders.iter().map(|f| f.prompt.clone()).collect::<Vec<_>>(),
        prompts
    );
    assert!(folders.iter().all(|f| f.samples.len() == 4));

    let (results, summary) = score_folder(&root).unwrap();
    assert_eq!(results.len(), 4 * prompts.len());
    let out = dir.path().join("results.jsonl");
    write_results_jsonl(&out, &results).unwrap();
    assert_eq!(read_results_jsonl(&out).unwrap(), results);
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    for key in [
        "filename", "tag", "prompt", "correct", "reason", "metadata", "details",
    ] {
        assert!(
            line.get(key).is_some(),
            "results line lacks `{key}`: {line}"
        );
    }
    assert!(line["filename"]
        .as_str()
        .unwrap()
        .ends_with("00000/samples/0000.png"));
    assert_eq!(results[0].parsed_metadata().unwrap(), prompts[0]);
    let blank = results.iter().find(|r| !r.correct).unwrap();
    assert_eq!(blank.tag, Tag::Colors);
    assert!(
        blank.reason.starts_with("expected ") && blank.reason.ends_with("found 0"),
        "{}",
        blank.reason
    );

    // Summary: colours 50%, everything else 100%, overall the mean of the six tag means.
    assert_eq!(summary.tags.len(), 6);
    assert_eq!(summary.total_images, results.len());
    assert_eq!(summary.total_prompts, prompts.len());
    for t in &summary.tags {
        let want = if t.tag == Tag::Colors { 0.5 } else { 1.0 };
        assert_eq!(t.accuracy, want, "{:?}", t);
        assert_eq!(
            t.total,
            4 * prompts.iter().filter(|p| p.tag == t.tag).count()
        );
        assert!(t.ci95[0] <= t.accuracy && t.accuracy <= t.ci95[1]);
    }
    let mean = summary.tags.iter().map(|t| t.accuracy).sum::<f64>() / 6.0;
    assert!((summary.overall - mean).abs() < 1e-12);
    assert!((summary.overall - 5.5 / 6.0).abs() < 1e-12);
    assert_eq!(
        summary.correct_prompts, 1.0,
        "every prompt has a correct sample"
    );
    assert!(summary.overall_ci95[0] < summary.overall && summary.overall < summary.overall_ci95[1]);
    assert_eq!(
        Summary::from_results(&read_results_jsonl(&out).unwrap()),
        summary
    );
    let text = summary.to_text();
    assert!(text.contains("colors           = 50.00%"), "{text}");
    assert!(
        text.contains("Overall score (avg. over tasks): 0.91667"),
        "{text}"
    );

    let (seen, held) = split_held_out(&results);
    assert_eq!(seen.len() + held.len(), results.len());
    assert!(held
        .iter()
        .all(|r| r.parsed_metadata().unwrap().held_out == Some(true)));
}

#[test]
fn mismatched_inputs_and_missing_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = write_geneval_folder(dir.path(), &eval_prompts_with(0, 1), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("sample lists"), "{err}");
    std::fs::create_dir_all(dir.path().join("00007/samples")).unwrap();
    let err = score_folder(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("00007") && err.contains("metadata.jsonl"),
        "{err}"
    );
}
