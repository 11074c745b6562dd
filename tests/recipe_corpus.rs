//! Recipes as a user meets them: every malformed recipe in tests/recipes/malformed fails
//! `softalign recipe check` with a message that names the problem; every shipped recipe passes.
use std::path::{Path, PathBuf};
use std::process::Command;

fn check(file: &Path, sets: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_softalign"));
    cmd.args(["recipe", "check"]).arg(file);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("run softalign");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn malformed_recipes_fail_with_a_message_that_names_the_problem() {
    let dir = root().join("tests/recipes/malformed");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml") && !p.ends_with("base.toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 15,
        "the corpus should hold at least 15 recipes, has {}",
        files.len()
    );
    let mut failures = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let expects: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expects.is_empty(),
            "{} has no `# expect:` line",
            f.display()
        );
        let (ok, _, stderr) = check(f, &[]);
        let missing: Vec<&&str> = expects.iter().filter(|e| !stderr.contains(**e)).collect();
        if ok || !missing.is_empty() || !stderr.contains(".toml") || stderr.contains("panicked") {
            failures.push(format!(
                "{}: ok={ok}, missing {missing:?}\n  stderr: {}",
                f.display(),
                stderr.trim()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_base_recipe_passes_and_overrides_apply() {
    let base = root().join("tests/recipes/malformed/base.toml");
    let (ok, stdout, stderr) = check(
        &base,
        &[
            "train.lr=5e-4",
            "objective.0.weight=2",
            "adapter.0.tokens=8",
        ],
    );
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["recipe"]["train"]["lr"], 5e-4);
    assert_eq!(v["recipe"]["objective"][0]["weight"], 2.0);
    assert_eq!(v["recipe"]["adapter"][0]["tokens"], 8);
    assert_eq!(v["recipe"]["seed"], 7);
    assert_eq!(v["hash"].as_str().unwrap().len(), 64);
    // Overrides that cannot apply name themselves.
    let (ok, _, stderr) = check(&base, &["objective.3.weight=2"]);
    assert!(
        !ok && stderr.contains("--set objective.3.weight=2") && stderr.contains("past the end"),
        "{stderr}"
    );
    let (ok, _, stderr) = check(&base, &["train.lr=-1"]);
    assert!(
        !ok && stderr.contains("train.lr must be a positive number"),
        "{stderr}"
    );
    let (ok, _, stderr) = check(&base, &["train.lr=fast"]);
    assert!(!ok && stderr.contains("--set train.lr=fast"), "{stderr}");
}

/// The SD3 recipes point at a model folder users supply; check them against a folder holding
/// just the sd3-medium config.json (a recipe check reads no weights).
fn sd3_medium_config_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let cfg = softalign_backbones::sd3::config::Sd3Config::sd3_medium().to_json();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    // The UNet recipes read `<path>/unet/config.json`; one folder serves both kinds.
    std::fs::create_dir_all(dir.path().join("unet")).unwrap();
    let unet = softalign_backbones::unet::UNetConfig::sd15().to_json();
    std::fs::write(dir.path().join("unet/config.json"), unet.to_string()).unwrap();
    dir
}

#[test]
fn every_shipped_recipe_passes_check() {
    let sd3 = sd3_medium_config_dir();
    let sd3_override = format!("backbone.path={}", sd3.path().display());
    let mut stack = vec![root().join("recipes")];
    let mut n = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "toml") {
                let (mut ok, _, mut stderr) = check(&p, &[]);
                if !ok && stderr.contains("config.json") {
                    (ok, _, stderr) = check(&p, &[&sd3_override]);
                }
                assert!(ok, "{} fails its check:\n{stderr}", p.display());
                n += 1;
            }
        }
    }
    println!("{n} shipped recipes pass `softalign recipe check`");
}
