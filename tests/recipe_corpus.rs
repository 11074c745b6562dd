//! Recipes as a user meets them: every malformed recipe in tests/recipes/malformed fails
//! `softalign recipe check` with a message that names the problem; every shipped recipe passes.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
        // Lossy: one recipe of the corpus is deliberately not UTF-8.
        let text = String::from_utf8_lossy(&std::fs::read(f).unwrap()).into_owned();
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

/// Every shipped recipe passes its check on a machine without the models: a missing folder
/// named like a released model is checked against that preset's shapes, saying so in one line.
#[test]
fn every_shipped_recipe_passes_check() {
    let mut stack = vec![root().join("recipes")];
    let mut n = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "toml") {
                let (ok, _, stderr) = check(&p, &[]);
                assert!(ok, "{} fails its check:\n{stderr}", p.display());
                let real = !p.to_string_lossy().contains("/shapes/");
                if real {
                    let notes = stderr
                        .lines()
                        .filter(|l| l.contains("checked against the"))
                        .count();
                    assert!(notes >= 1, "{}: no preset note:\n{stderr}", p.display());
                }
                n += 1;
            }
        }
    }
    println!("{n} shipped recipes pass `softalign recipe check`");
}

/// A recipe naming a missing folder that is no released model's still fails, saying "folder
/// not found"; the README's example recipe passes (against the sd3-medium preset).
#[test]
fn missing_folders_and_the_readme_example() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("r.toml"),
        "[backbone]\ntype = \"sd3\"\npath = \"models/my-own\"\n[train]\nsteps = 1\nlr = 1e-3\n",
    )
    .unwrap();
    let (ok, _, stderr) = check(&d.join("r.toml"), &[]);
    assert!(!ok && stderr.contains("folder not found"), "{stderr}");
    assert!(
        stderr.contains(&d.join("models/my-own").display().to_string()),
        "{stderr}"
    );

    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let example = readme
        .split("## Recipes\n\n```toml\n")
        .nth(1)
        .and_then(|r| r.split("```").next())
        .expect("the README's recipe example");
    std::fs::write(d.join("readme.toml"), example).unwrap();
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("train.jsonl"),
        "{\"image\": \"a.png\", \"captions\": [\"a cat\"]}\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = check(&d.join("readme.toml"), &[]);
    assert!(ok, "the README's example fails its check:\n{stderr}");
    assert!(
        stderr.contains("checked against the `sd3-medium` preset"),
        "{stderr}"
    );
    assert!(!stderr.contains("no [data] table"), "{stderr}");
    assert!(stdout.contains("image_manifest"), "{stdout}");
}

/// A folder holding just what recipe check reads of an SD1.5 pipeline: model_index.json and
/// unet/config.json (the VAE and text encoder listed, their folders absent).
fn sd15_index_only() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("unet")).unwrap();
    let unet = softalign_backbones::unet::UNetConfig::sd15().to_json();
    std::fs::write(d.join("unet/config.json"), unet.to_string()).unwrap();
    std::fs::write(
        d.join("model_index.json"),
        r#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [null, null]}"#,
    )
    .unwrap();
    dir
}

fn backbone_recipe(dir: &Path, kind: &str, model: &Path) -> PathBuf {
    let p = dir.join(format!("{kind}.toml"));
    std::fs::write(
        &p,
        format!(
            "[backbone]\ntype = \"{kind}\"\npath = \"{}\"\n[train]\nsteps = 1\nlr = 1e-3\n",
            model.display()
        ),
    )
    .unwrap();
    p
}

/// A pipeline folder that lists a component it lacks fails the check (not only training),
/// and a folder of another model type says what it is and what was asked.
#[test]
fn pipeline_folders_are_checked_without_weights() {
    let model = sd15_index_only();
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = check(&backbone_recipe(dir.path(), "unet", model.path()), &[]);
    assert!(!ok, "a pipeline without its vae passes:\n{stderr}");
    assert!(
        stderr.contains("lists the component `vae` but its folder is missing"),
        "{stderr}"
    );
    let (ok, _, stderr) = check(&backbone_recipe(dir.path(), "sd3", model.path()), &[]);
    assert!(!ok);
    assert!(
        stderr.contains(
            "is a StableDiffusionPipeline folder (a UNet model), read by type = \"unet\""
        ) && stderr.contains("backbone `sd3` reads"),
        "{stderr}"
    );
    assert!(!stderr.contains("No such file"), "{stderr}");
}

/// `extends`: a child that switches a table's `type` replaces the base's table; relative
/// paths resolve against the file that wrote them (`--set` ones against the working
/// directory); the resolved JSON holds absolute paths and is itself a recipe.
#[test]
fn extends_switches_types_and_paths_resolve_where_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base_dir, child_dir) = (d.join("base"), d.join("child"));
    std::fs::create_dir_all(base_dir.join("data")).unwrap();
    std::fs::create_dir_all(&child_dir).unwrap();
    std::fs::write(
        base_dir.join("data/train.jsonl"),
        "{\"image\": \"a.png\", \"captions\": [\"a cat\"]}\n",
    )
    .unwrap();
    std::fs::write(
        base_dir.join("base.toml"),
        r#"
[backbone]
type = "sd3"
preset = "sd3-medium"

[[adapter]]
type = "soft_tokens"
tokens = 2
sites = "joint_blocks[0..1]"

[[objective]]
type = "softrepa_contrastive"

[data]
type = "image_manifest"
path = "data/train.jsonl"
resolution = 256

[train]
steps = 1
lr = 1e-3
"#,
    )
    .unwrap();
    // The README's cache workflow: the child wraps the base's data in an encoding cache.
    std::fs::write(
        child_dir.join("child.toml"),
        r#"extends = "../base/base.toml"

[data]
type = "encoded_cache"
path = "cache"
source = { type = "image_manifest", path = "../base/data/train.jsonl", resolution = 256 }
"#,
    )
    .unwrap();
    let (ok, stdout, stderr) = check(&child_dir.join("child.toml"), &[]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let data = &v["recipe"]["data"];
    assert_eq!(data["type"], "encoded_cache", "{data}");
    let abs = |p: &Path| p.to_string_lossy().into_owned();
    assert_eq!(data["path"], abs(&child_dir.join("cache")));
    assert_eq!(
        data["source"]["path"],
        abs(&base_dir.join("data/train.jsonl"))
    );

    // The base alone: its relative path resolved against its own folder, not the cwd's.
    let (ok, stdout, stderr) = check(&base_dir.join("base.toml"), &[]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        v["recipe"]["data"]["path"],
        abs(&base_dir.join("data/train.jsonl"))
    );

    // --set paths are the working directory's.
    let out = Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(["recipe", "check"])
        .arg(child_dir.join("child.toml"))
        .args(["--set", "data.path=elsewhere"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["recipe"]["data"]["path"], abs(&d.join("elsewhere")));

    // The resolved recipe, as a run's recipe.json, is a recipe with the same hash.
    let (_, stdout, _) = check(&child_dir.join("child.toml"), &[]);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let json = d.join("recipe.json");
    std::fs::write(&json, serde_json::to_string_pretty(&v["recipe"]).unwrap()).unwrap();
    let (ok, again, stderr) = check(&json, &[]);
    assert!(ok, "{stderr}");
    let w: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(w["hash"], v["hash"]);
    assert_eq!(w["recipe"], v["recipe"]);
}

/// A reader that goes away (`softalign list --examples | head -1`, `recipe check R | true`)
/// ends the command quietly, killed by SIGPIPE as `ls` is, not with a panic (exit 101).
#[test]
fn a_closed_stdout_ends_commands_quietly() {
    let recipe = root().join("recipes/sd3-softrepa.toml");
    let recipe = recipe.to_str().unwrap();
    for args in [vec!["list", "--examples"], vec!["recipe", "check", recipe]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_softalign"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Closed before the child (still loading its libraries) writes a byte.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(101), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                out.status.signal(),
                Some(13),
                "{args:?}: {:?} {err}",
                out.status
            );
        }
    }
}
