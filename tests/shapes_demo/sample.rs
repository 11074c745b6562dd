//! `softalign sample` on a tiny shapes model: N PNGs per prompt and a grid, the same
//! files again for the same seed, other images for another seed, and noise that depends on
//! (seed, prompt, image) only, not on how prompts are batched.
use crate::common::{png_files, s, softalign, tiny_model};

fn sample(model: &str, out: &std::path::Path, extra: &[&str]) {
    let mut args = vec![
        "sample",
        "--model",
        model,
        "--prompt",
        "a photo of a red circle",
        "--prompt",
        "a photo of two blue squares",
        "--n",
        "3",
        "--steps",
        "2",
        "--quiet",
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    softalign(&args);
}

#[test]
fn sample_writes_images_and_grid_reproducibly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let (a, b, c, d) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
        tmp.path().join("d"),
    );
    sample(s(&model), &a, &["--seed", "5"]);
    let files = png_files(&a);
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "0000-00.png",
            "0000-01.png",
            "0000-02.png",
            "0001-00.png",
            "0001-01.png",
            "0001-02.png",
            "grid.png"
        ]
    );
    let img = image::open(a.join("0000-00.png")).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (32, 32));
    // 2 rows x 3 columns of 4x tiles (128 px) with 2 px gutters.
    let grid = image::open(a.join("grid.png")).unwrap().to_rgb8();
    assert_eq!(grid.dimensions(), (2 + 3 * 130, 2 + 2 * 130));
    assert_eq!(
        std::fs::read_to_string(a.join("prompts.txt")).unwrap(),
        "a photo of a red circle\na photo of two blue squares\n"
    );

    sample(s(&model), &b, &["--seed", "5"]);
    for f in &files {
        let name = f.file_name().unwrap();
        assert_eq!(
            std::fs::read(f).unwrap(),
            std::fs::read(b.join(name)).unwrap(),
            "{name:?} differs between two runs with the same seed"
        );
    }

    sample(s(&model), &c, &["--seed", "6"]);
    assert_ne!(
        std::fs::read(a.join("0000-00.png")).unwrap(),
        std::fs::read(c.join("0000-00.png")).unwrap(),
        "another seed gave the same image"
    );

    // One image per forward instead of all six: each image's noise is its own.
    sample(s(&model), &d, &["--seed", "5", "--batch", "1"]);
    for f in files.iter().filter(|f| !f.ends_with("grid.png")) {
        let x = image::open(f).unwrap().to_rgb8();
        let y = image::open(d.join(f.file_name().unwrap()))
            .unwrap()
            .to_rgb8();
        let max = x
            .as_raw()
            .iter()
            .zip(y.as_raw())
            .map(|(p, q)| p.abs_diff(*q))
            .max()
            .unwrap();
        assert!(max <= 2, "{f:?}: batching changed pixels by {max}");
    }
}

#[test]
fn sample_refuses_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args([
            "sample",
            "--model",
            s(tmp.path()),
            "--out",
            s(&tmp.path().join("o")),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no prompts"), "{err}");
}
