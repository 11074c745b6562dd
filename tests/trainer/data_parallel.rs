//! Data-parallel `softalign train` on PyTorch's c10d (gloo), two ranks on 127.0.0.1: the same
//! tensors as one process with twice the gradient accumulation (adapter and full-parameter
//! mode, launched by plain environment variables as srun does and by torchrun), a lost rank
//! named by the survivor, and `--resume latest` after it.
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use softalign_core::tensors::MappedSafetensors;
use softalign_core::train::checkpoint::{step_dir_name, PARAMS_FILE};
use tch::Tensor;

use super::train_cli::write_fixture;

const STEPS: u64 = 6;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn train_cmd(recipe: &Path, run: &Path, sets: &[&str], resume: bool) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_softalign"));
    c.args(["train", "--quiet", "--recipe"])
        .arg(recipe)
        .arg("--run-dir")
        .arg(run);
    for s in sets {
        c.args(["--set", s]);
    }
    if resume {
        c.args(["--resume", "latest"]);
    }
    for v in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_STEP_NUM_TASKS",
    ] {
        c.env_remove(v);
    }
    c
}

/// Starts `world` ranks, one process each, told its rank by the environment as env:// (or,
/// with `slurm`, as srun) does.
fn spawn_ranks(recipe: &Path, run: &Path, sets: &[&str], resume: bool, world: usize) -> Vec<Child> {
    spawn(recipe, run, sets, resume, world, false, &[])
}

fn spawn(
    recipe: &Path,
    run: &Path,
    sets: &[&str],
    resume: bool,
    world: usize,
    slurm: bool,
    envs: &[(&str, &str)],
) -> Vec<Child> {
    let port = free_port();
    (0..world)
        .map(|r| {
            let mut c = train_cmd(recipe, run, sets, resume);
            if slurm {
                c.env("SLURM_STEP_NUM_TASKS", world.to_string())
                    .env("SLURM_PROCID", r.to_string())
                    .env("SLURM_LOCALID", r.to_string())
                    .env("SLURM_STEP_NODELIST", "localhost")
                    .env("SLURM_JOB_ID", "4242");
            } else {
                c.env("RANK", r.to_string())
                    .env("LOCAL_RANK", r.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("MASTER_ADDR", "127.0.0.1");
            }
            c.envs(envs.iter().copied())
                .env("MASTER_PORT", port.to_string())
                .env("SOFTALIGN_DIST_TIMEOUT_S", "60")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn all_ok(children: Vec<Child>) -> Vec<Output> {
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    outs
}

fn single(recipe: &Path, run: &Path, sets: &[&str]) {
    let o = train_cmd(recipe, run, sets, false).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn params_at(run: &Path, step: u64) -> BTreeMap<String, Tensor> {
    let p = run
        .join("checkpoints")
        .join(step_dir_name(step))
        .join(PARAMS_FILE);
    MappedSafetensors::open(&p).unwrap().all().unwrap()
}

fn assert_same(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>, what: &str) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: parameter names"
    );
    let mut worst = 0f64;
    for (k, x) in a {
        let d = (x - &b[k]).abs().max().double_value(&[]);
        worst = worst.max(d);
        assert!(d <= 1e-6, "{what}: `{k}` differs by {d}");
    }
    eprintln!("{what}: {} tensors, largest difference {worst:e}", a.len());
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn fixture(full: bool) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    write_fixture(tmp.path(), STEPS);
    let recipe = tmp.path().join("recipe.toml");
    if full {
        // The same model trained in full (as the shapes bases are): no adapter, DSM only.
        let text = std::fs::read_to_string(&recipe).unwrap();
        let start = text.find("[[adapter]]").unwrap();
        let end = text.find("[data]").unwrap();
        let text = format!(
            "{}[[objective]]\ntype = \"dsm\"\n{}",
            &text[..start],
            &text[end..]
        )
        .replace("[train]\n", "[train]\nmode = \"full\"\n");
        std::fs::write(&recipe, text).unwrap();
    }
    (tmp, recipe)
}

#[test]
fn two_ranks_equal_one_process_with_twice_the_accumulation() {
    let (tmp, recipe) = fixture(false);
    let one = tmp.path().join("one");
    single(&recipe, &one, &["train.grad_accum=2"]);
    let two = tmp.path().join("two");
    let outs = all_ok(spawn_ranks(&recipe, &two, &[], false, 2));
    let err0 = String::from_utf8_lossy(&outs[0].stderr);
    assert!(err0.contains("data-parallel: 2 ranks"), "{err0}");
    assert!(
        String::from_utf8_lossy(&outs[1].stderr).trim().is_empty(),
        "rank 1 prints nothing"
    );
    assert_same(
        &params_at(&one, STEPS),
        &params_at(&two, STEPS),
        "adapter, 2 ranks vs accum 2",
    );
    // Rank 0 logs the mean over ranks, which is the single process's mean over micro-batches.
    for (a, b) in losses(&one).iter().zip(losses(&two)) {
        assert!((a - b).abs() < 1e-5, "logged loss {a} vs {b}");
    }
    assert!(two.join("final/adapter.safetensors").exists());

    // Another world size on resume: 2 ranks for 4 steps, then 1 process with grad_accum 2
    // (ranks x grad_accum kept) continues to exactly the uninterrupted tensors.
    let mixed = tmp.path().join("mixed");
    all_ok(spawn_ranks(&recipe, &mixed, &["train.steps=4"], false, 2));
    let o = train_cmd(&recipe, &mixed, &["train.grad_accum=2"], true)
        .arg("--allow-recipe-change")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(
        &params_at(&one, STEPS),
        &params_at(&mixed, STEPS),
        "2 ranks, then 1 process",
    );
}

#[test]
fn global_contrastive_scope_equals_one_process_with_every_ranks_images() {
    let (tmp, recipe) = fixture(false);
    let one = tmp.path().join("one");
    single(&recipe, &one, &["train.images_per_step=6"]);
    let two = tmp.path().join("two");
    let outs = all_ok(spawn_ranks(
        &recipe,
        &two,
        &["train.contrastive_scope=global"],
        false,
        2,
    ));
    let err0 = String::from_utf8_lossy(&outs[0].stderr);
    assert!(err0.contains("of 6 images (every rank's)"), "{err0}");
    assert_same(
        &params_at(&one, STEPS),
        &params_at(&two, STEPS),
        "global scope, 2 ranks x 3 images vs 1 process x 6",
    );
    for (a, b) in losses(&one).iter().zip(losses(&two)) {
        assert!((a - b).abs() < 1e-5, "logged loss {a} vs {b}");
    }
}

#[test]
fn full_parameter_mode_in_buckets_equals_one_process() {
    let (tmp, recipe) = fixture(true);
    let one = tmp.path().join("one");
    single(&recipe, &one, &["train.grad_accum=2"]);
    let two = tmp.path().join("two");
    // Launched as srun launches, with small buckets, so the gradients go as several
    // all-reduces in flight together.
    let buckets = [("SOFTALIGN_DIST_BUCKET_MB", "0.01")];
    let outs = all_ok(spawn(&recipe, &two, &[], false, 2, true, &buckets));
    let err0 = String::from_utf8_lossy(&outs[0].stderr);
    assert!(err0.contains("2 ranks (srun, gloo)"), "{err0}");
    assert_same(
        &params_at(&one, STEPS),
        &params_at(&two, STEPS),
        "full model, 2 ranks vs accum 2",
    );
}

#[test]
fn torchrun_launches_the_ranks() {
    let (tmp, recipe) = fixture(false);
    let one = tmp.path().join("one");
    single(&recipe, &one, &["train.grad_accum=2"]);
    let two = tmp.path().join("two");
    let py = std::env::var("SOFTALIGN_PYTHON").unwrap_or_else(|_| "python3".into());
    let o = Command::new(py)
        .args(["-m", "torch.distributed.run", "--nproc-per-node", "2"])
        .arg(format!("--master-port={}", free_port()))
        .arg("--no-python")
        .arg(env!("CARGO_BIN_EXE_softalign"))
        .args(["train", "--quiet", "--recipe"])
        .arg(&recipe)
        .arg("--run-dir")
        .arg(&two)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "torchrun: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_same(
        &params_at(&one, STEPS),
        &params_at(&two, STEPS),
        "torchrun, 2 ranks vs accum 2",
    );
}

#[test]
fn a_lost_rank_is_named_and_the_run_resumes() {
    let (tmp, recipe) = fixture(false);
    let run = tmp.path().join("run");
    // Long enough that rank 1 is killed mid-run: 40 steps, a checkpoint every 2 (neither rank
    // can pass the other by more than a step).
    let sets = ["train.steps=40"];
    let mut ranks = spawn_ranks(&recipe, &run, &sets, false, 2);
    let first = run.join("checkpoints").join(step_dir_name(2));
    let began = Instant::now();
    while !first.exists() {
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    ranks[1].kill().unwrap();
    let killed_at = Instant::now();
    let lost = ranks.remove(1).wait_with_output().unwrap();
    assert!(!lost.status.success());
    let o = ranks.remove(0).wait_with_output().unwrap();
    let waited = killed_at.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "rank 0 must stop: {err}");
    assert!(
        err.contains("rank 0 of 2") && err.contains("lost: rank 1"),
        "rank 0's message names the lost rank: {err}"
    );
    assert!(err.contains("--resume latest"), "{err}");
    eprintln!(
        "rank 0 stopped {:.1} s after rank 1 was killed:\n{err}",
        waited.as_secs_f64()
    );
    assert!(waited < Duration::from_secs(60), "within the timeout");

    let children = spawn_ranks(&recipe, &run, &sets, true, 2);
    all_ok(children);
    assert!(run.join("final/adapter.safetensors").exists());
    let n = losses(&run).len();
    assert_eq!(
        n, 40,
        "metrics.jsonl holds every step once after the resume"
    );
}

#[test]
fn a_peer_that_never_comes_is_an_error_not_a_hang() {
    let (tmp, recipe) = fixture(false);
    let began = Instant::now();
    let o = train_cmd(&recipe, &tmp.path().join("run"), &[], false)
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .env("SOFTALIGN_DIST_TIMEOUT_S", "3")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("rank 0 of 2") && err.contains("could not join the gloo process group"),
        "{err}"
    );
    assert!(
        err.contains("1/2 clients joined"),
        "c10d's own count: {err}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(30),
        "{:?}",
        began.elapsed()
    );
}

#[test]
fn a_signal_to_one_rank_stops_every_rank_after_the_same_step() {
    let (tmp, recipe) = fixture(false);
    let sets = ["train.steps=30"];
    let straight = tmp.path().join("straight");
    all_ok(spawn_ranks(&recipe, &straight, &sets, false, 2));

    let run = tmp.path().join("run");
    let mut ranks = spawn_ranks(&recipe, &run, &sets, false, 2);
    let began = Instant::now();
    while super::preempt_cli::metrics_lines(&run) < 5 {
        assert!(began.elapsed() < Duration::from_secs(120), "no step 5");
        assert!(ranks[1].try_wait().unwrap().is_none(), "rank 1 ended early");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Only rank 1 is told (as when a node's processes are signalled one by one): the stop
    // travels with the step's all-reduce, so rank 0 stops after the same step, and saves it.
    super::preempt_cli::send(&ranks[1], libc::SIGTERM);
    let outs: Vec<Output> = ranks
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for (r, o) in outs.iter().enumerate() {
        assert_eq!(
            o.status.code(),
            Some(75),
            "rank {r}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let marker = softalign_core::train::preempt::read_marker(&run)
        .unwrap()
        .expect("rank 0 writes the marker");
    let m = marker.step;
    assert!((5..30).contains(&m), "stopped at {m}");
    assert_eq!(marker.signal, None, "rank 0 itself got no signal");
    assert!(run.join("checkpoints").join(step_dir_name(m)).is_dir());
    assert_eq!(losses(&run).len() as u64, m);

    all_ok(spawn_ranks(&recipe, &run, &sets, true, 2));
    let (a, b) = (params_at(&straight, 30), params_at(&run, 30));
    for (k, x) in &a {
        assert!(x.equal(&b[k]), "stopped at {m}: `{k}` differs");
    }
}
