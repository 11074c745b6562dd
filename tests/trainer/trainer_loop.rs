//! The training loop end to end on a toy task: exact resume after SIGKILL, the non-finite
//! guard, metrics.jsonl, checkpoint rotation, EMA export, full-parameter mode.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use softalign_core::logging::LoggingConfig;
use softalign_core::tensors::{save_safetensors, MappedSafetensors};
use softalign_core::train::checkpoint::{self, ResumeFrom};
use softalign_core::train::config::{CheckpointConfig, Schedule, TrainMode};
use softalign_core::train::precision::{freeze_in_dtype, full_parameters};
use softalign_core::train::seed::seed_everything;
use softalign_core::train::{train, MicroStep, TrainConfig, TrainTask, TrainerOptions};
use softalign_core::Result;
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

/// torch's generator is global to the process and the trainer reseeds it every micro-step, so
/// two trainings in parallel test threads would interleave their draws: tests here take turns.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

const SEED: u64 = 1234;
const ENV_RUN_DIR: &str = "SOFTALIGN_TRAINER_TEST_RUN_DIR";
const ENV_BLOCK_AT: &str = "SOFTALIGN_TRAINER_TEST_BLOCK_AT";
const BLOCKED_MARK: &str = "blocked-here";

/// A frozen two-layer MLP "backbone" with soft-token-like inputs, a time table and a head.
struct ToyTask {
    _backbone_vs: VarStore,
    mlp: nn::Sequential,
    tokens: Tensor,
    time_table: Tensor,
    head: Tensor,
    /// An adapter-style token EMA and a call counter: task state outside the parameters.
    token_ema: Tensor,
    steps_seen: Tensor,
    /// Steps whose loss becomes NaN (loss) or whose gradient becomes NaN (grad).
    nan_loss_steps: Vec<u64>,
    nan_grad_steps: Vec<u64>,
    /// Hang in this step's second micro-batch (the killed child).
    block_at: Option<(u64, PathBuf)>,
}

impl ToyTask {
    fn new() -> Self {
        seed_everything(SEED);
        let mut vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let mlp = nn::seq()
            .add(nn::linear(&root / "fc1", 8, 16, Default::default()))
            .add_fn(|x| x.gelu("none"))
            .add(nn::linear(&root / "fc2", 16, 4, Default::default()));
        freeze_in_dtype(&mut vs, softalign_core::dtype::DType::F32);
        let opts = (Kind::Float, Device::Cpu);
        let tokens = (Tensor::randn([2, 8], opts) * 0.5).set_requires_grad(true);
        let time_table = (Tensor::randn([5, 8], opts) * 0.1).set_requires_grad(true);
        let head = (Tensor::randn([4, 4], opts) * 0.5).set_requires_grad(true);
        let token_ema = tokens.detach().copy();
        Self {
            _backbone_vs: vs,
            mlp,
            tokens,
            time_table,
            head,
            token_ema,
            steps_seen: Tensor::zeros([1], (Kind::Int64, Device::Cpu)),
            nan_loss_steps: vec![],
            nan_grad_steps: vec![],
            block_at: None,
        }
    }
}

impl TrainTask for ToyTask {
    fn parameters(&self) -> Vec<(String, Tensor)> {
        vec![
            ("default.tokens".into(), self.tokens.shallow_clone()),
            ("time_table".into(), self.time_table.shallow_clone()),
            ("head.weight".into(), self.head.shallow_clone()),
        ]
    }
    fn extra_state(&self) -> Vec<(String, Tensor)> {
        vec![
            ("token_ema".into(), self.token_ema.shallow_clone()),
            ("steps_seen".into(), self.steps_seen.shallow_clone()),
        ]
    }
    fn load_extra_state(&mut self, t: &BTreeMap<String, Tensor>) -> Result<()> {
        self.token_ema.copy_(&t["token_ema"]);
        self.steps_seen.copy_(&t["steps_seen"]);
        Ok(())
    }
    fn micro_step(&mut self, m: &MicroStep) -> Result<BTreeMap<String, f64>> {
        if let Some((step, dir)) = &self.block_at {
            if m.step == *step && m.micro == 1 {
                std::fs::write(dir.join(BLOCKED_MARK), b"").unwrap();
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        // Every draw comes from torch's global generator, seeded by the trainer.
        let opts = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([6, 8], opts);
        let t = Tensor::randint(5, [6], (Kind::Int64, Device::Cpu));
        let target = Tensor::randn([6, 4], opts);
        let h =
            x + self.tokens.mean_dim(0, true, Kind::Float) + self.time_table.index_select(0, &t);
        let y = self.mlp.forward(&h).matmul(&self.head);
        let mse = (y - target).square().mean(Kind::Float);
        let reg = self.tokens.square().mean(Kind::Float) * 0.01;
        let mut loss = &mse + &reg;
        if self.nan_loss_steps.contains(&m.step) {
            loss *= f64::NAN;
        }
        if self.nan_grad_steps.contains(&m.step) {
            // Value 0, gradient 0 * inf = NaN.
            loss += (&self.head - self.head.detach())
                .abs()
                .sqrt()
                .sum(Kind::Float);
        }
        (&loss * m.loss_scale).backward();
        Ok(BTreeMap::from([
            ("loss".to_string(), loss.double_value(&[])),
            ("mse".to_string(), mse.double_value(&[])),
            ("reg".to_string(), reg.double_value(&[])),
        ]))
    }
    fn after_step(&mut self, _step: u64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.token_ema
            .copy_(&(&self.token_ema * 0.5 + self.tokens.detach() * 0.5));
        let _ = self.steps_seen.f_add_scalar_(1)?;
        Ok(())
    }
    fn export(&self, dir: &Path, step: u64) -> Result<()> {
        let meta = BTreeMap::from([("step".to_string(), step.to_string())]);
        save_safetensors(dir.join("adapter.safetensors"), &self.parameters(), &meta)
    }
}

fn config(steps: u64) -> TrainConfig {
    let cfg: TrainConfig = toml::from_str(&format!(
        r#"
        steps = {steps}
        grad_accum = 2
        lr = 0.05
        grad_clip = 0.5
        warmup_steps = 2
        log_every = 1
        schedule = {{ type = "warm_restarts", t_0 = 2, t_mult = 2, eta_min = 0.001, every = 2 }}
        ema = {{ decay = 0.9 }}
        checkpoint = {{ every = 3, keep = 2 }}
        device = "cpu"
        [[param_groups]]
        params = "time*"
        lr = 0.02
        weight_decay = 0.0
        "#
    ))
    .unwrap();
    assert_eq!(
        cfg.schedule,
        Schedule::WarmRestarts {
            t_0: 2,
            t_mult: 2,
            eta_min: 0.001,
            every: 2
        }
    );
    assert!(cfg.ema.is_some() && cfg.grad_clip.is_some());
    cfg
}

fn quiet_logging() -> LoggingConfig {
    LoggingConfig {
        progress: false,
        wandb: None,
    }
}

fn options(run_dir: &Path) -> TrainerOptions {
    let mut o = TrainerOptions::new(run_dir, SEED);
    o.progress = false;
    o.recipe = serde_json::json!({"train": "toy", "seed": SEED});
    o
}

fn tensor_bytes(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let st = MappedSafetensors::open(path).unwrap();
    st.all()
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let numel = t.numel();
            let mut b = vec![0u8; numel * t.kind().elt_size_in_bytes()];
            t.copy_data_u8(&mut b, numel);
            (n, b)
        })
        .collect()
}

fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Run as a separate process by `resume_after_sigkill_is_bit_identical`: trains into the
/// run folder named by the environment, hanging mid-step so the parent can kill it.
#[test]
#[ignore = "child process of resume_after_sigkill_is_bit_identical"]
fn child_interrupted_run() {
    let _serial = serial();
    let dir = PathBuf::from(std::env::var(ENV_RUN_DIR).expect("run dir in the environment"));
    let block: u64 = std::env::var(ENV_BLOCK_AT).unwrap().parse().unwrap();
    let mut task = ToyTask::new();
    task.block_at = Some((block, dir.clone()));
    train(&config(12), &quiet_logging(), options(&dir), &mut task).unwrap();
    unreachable!("the task blocks at step {block}");
}

/// `child_interrupted_run` as libtest names it: its module path inside this test binary.
fn child_test_name() -> String {
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    if module.is_empty() {
        "child_interrupted_run".into()
    } else {
        format!("{module}::child_interrupted_run")
    }
}

#[test]
fn resume_after_sigkill_is_bit_identical() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let resumed = tmp.path().join("resumed");
    let cfg = config(12);

    let t0 = Instant::now();
    let summary = train(
        &cfg,
        &quiet_logging(),
        options(&straight),
        &mut ToyTask::new(),
    )
    .unwrap();
    eprintln!("straight 12-step run: {:.2}s", t0.elapsed().as_secs_f64());
    assert_eq!(summary.steps, 12);
    assert_eq!(summary.skipped_steps, 0);

    // The child hangs in step index 8 (the 9th step): checkpoints 3 and 6 are on disk, step 7
    // and 8 ran past the last checkpoint and are lost with the process.
    std::fs::create_dir_all(&resumed).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &child_test_name(), "--ignored", "--nocapture"])
        .env(ENV_RUN_DIR, &resumed)
        .env(ENV_BLOCK_AT, "8")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !resumed.join(BLOCKED_MARK).exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("child exited before blocking: {status}");
        }
        assert!(Instant::now() < deadline, "child never reached step 8");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "{status}");
    let latest = checkpoint::latest(&resumed).unwrap().unwrap();
    assert_eq!(latest.file_name().unwrap(), "step-00000006");
    let logged: Vec<u64> = metrics(&resumed)
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, (1..=8).collect::<Vec<_>>());

    let mut opts = options(&resumed);
    opts.resume = Some(ResumeFrom::Latest);
    let summary = train(&cfg, &quiet_logging(), opts, &mut ToyTask::new()).unwrap();
    assert_eq!(summary.start_step, 6);

    for file in ["final/adapter.safetensors", "final-ema/adapter.safetensors"] {
        let a = tensor_bytes(&straight.join(file));
        let b = tensor_bytes(&resumed.join(file));
        assert_eq!(a.len(), 3);
        assert!(a == b, "{file} differs after resume");
    }
    let last = "checkpoints/step-00000012";
    for file in [
        "optimizer.safetensors",
        "ema.safetensors",
        "extra_state.safetensors",
        "params.safetensors",
    ] {
        let a = tensor_bytes(&straight.join(last).join(file));
        assert!(
            a == tensor_bytes(&resumed.join(last).join(file)),
            "{file} differs after resume"
        );
    }
    // EMA export differs from the plain one (the EMA really is an average).
    assert!(
        tensor_bytes(&straight.join("final/adapter.safetensors"))
            != tensor_bytes(&straight.join("final-ema/adapter.safetensors"))
    );

    // metrics.jsonl reads as one uninterrupted run, with the same losses.
    let (ma, mb) = (metrics(&straight), metrics(&resumed));
    assert_eq!(ma.len(), 12);
    assert_eq!(mb.len(), 12);
    for (a, b) in ma.iter().zip(&mb) {
        for key in ["step", "loss", "mse", "reg", "lr", "lr/group1", "grad_norm"] {
            assert_eq!(a[key], b[key], "{key} at step {}", a["step"]);
        }
    }
    // Clipping was active (some pre-clip norms above 0.5) and the schedule moved the lr.
    assert!(ma.iter().any(|v| v["grad_norm"].as_f64().unwrap() > 0.5));
    let lrs: Vec<f64> = ma.iter().map(|v| v["lr"].as_f64().unwrap()).collect();
    assert_eq!(lrs[0], 0.025); // warm-up 1/2
    assert!(
        lrs.windows(2).any(|w| w[1] < w[0]) && lrs.windows(2).any(|w| w[1] > w[0]),
        "{lrs:?}"
    );

    // Rotation: the newest two checkpoints plus `latest`, nothing partial.
    let mut names: Vec<String> = std::fs::read_dir(straight.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["latest", "step-00000009", "step-00000012"]);
    // The record of the run.
    for f in ["recipe.json", "command.txt", "versions.json", "seed"] {
        assert!(resumed.join(f).is_file(), "{f}");
    }
    let commands = std::fs::read_to_string(resumed.join("command.txt")).unwrap();
    assert_eq!(commands.lines().count(), 2, "{commands}");
}

#[test]
fn resume_refuses_another_seed_and_names_the_folder() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(3);
    cfg.checkpoint = CheckpointConfig { every: 1, keep: 1 };
    train(
        &cfg,
        &quiet_logging(),
        options(tmp.path()),
        &mut ToyTask::new(),
    )
    .unwrap();
    let mut opts = options(tmp.path());
    opts.seed = SEED + 1;
    opts.resume = Some(ResumeFrom::Latest);
    let err = train(&cfg, &quiet_logging(), opts, &mut ToyTask::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("step-00000003") && err.contains("seed"),
        "{err}"
    );
    let mut opts = options(tmp.path());
    opts.recipe = serde_json::json!({"changed": true});
    opts.resume = Some(ResumeFrom::Latest);
    let err = train(&cfg, &quiet_logging(), opts, &mut ToyTask::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("different recipe"), "{err}");
}

#[test]
fn non_finite_steps_are_skipped_then_stop_the_run() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(6);
    cfg.max_bad_steps = 3;
    cfg.ema = None;
    let mut task = ToyTask::new();
    task.nan_loss_steps = vec![1];
    task.nan_grad_steps = vec![2];
    let before: Vec<Tensor> = task
        .parameters()
        .iter()
        .map(|(_, p)| p.detach().copy())
        .collect();
    let summary = train(&cfg, &quiet_logging(), options(tmp.path()), &mut task).unwrap();
    assert_eq!(summary.skipped_steps, 2);
    assert_eq!(
        task.steps_seen.int64_value(&[0]),
        4,
        "after_step runs for good steps only"
    );
    let m = metrics(tmp.path());
    let skipped: Vec<u64> = m
        .iter()
        .filter(|v| v["skipped"].as_f64() == Some(1.0))
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped, [2, 3]);
    assert!(m[1]["loss"].is_null(), "NaN loss logged as null");
    assert!(
        m[2]["grad_norm"].is_null(),
        "NaN gradient norm logged as null"
    );
    for (b, (_, p)) in before.iter().zip(task.parameters()) {
        assert!(!b.equal(&p), "good steps still trained");
    }

    // Three in a row: a clear error, and no export.
    let tmp = tempfile::tempdir().unwrap();
    let mut task = ToyTask::new();
    task.nan_loss_steps = vec![2, 3, 4, 5];
    let err = train(&cfg, &quiet_logging(), options(tmp.path()), &mut task)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("3 consecutive") && err.contains("step 5"),
        "{err}"
    );
    assert!(!tmp.path().join("final").exists());
    assert_eq!(
        metrics(tmp.path()).len(),
        5,
        "every step up to the failure is logged"
    );
}

#[test]
fn metrics_jsonl_holds_every_term_at_the_logging_interval() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(5);
    cfg.log_every = 2;
    train(
        &cfg,
        &quiet_logging(),
        options(tmp.path()),
        &mut ToyTask::new(),
    )
    .unwrap();
    let m = metrics(tmp.path());
    let steps: Vec<u64> = m.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [2, 4, 5], "every 2nd step and the last");
    for v in &m {
        for key in [
            "loss",
            "mse",
            "reg",
            "lr",
            "lr/group1",
            "grad_norm",
            "step_time_s",
            "skipped",
        ] {
            assert!(v[key].is_number(), "{key} missing in {v}");
        }
        let (loss, mse, reg) = (
            v["loss"].as_f64().unwrap(),
            v["mse"].as_f64().unwrap(),
            v["reg"].as_f64().unwrap(),
        );
        assert!(
            (loss - mse - reg).abs() < 1e-6,
            "loss is the sum of its terms: {v}"
        );
    }
}

#[test]
fn param_group_globs_must_match_something() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(2);
    cfg.param_groups[0].params = "tiem*".into();
    let err = train(
        &cfg,
        &quiet_logging(),
        options(tmp.path()),
        &mut ToyTask::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("tiem*") && err.contains("default.tokens"),
        "{err}"
    );
}

/// Full-parameter mode: the backbone's own VarStore weights are what AdamW moves.
struct FullTask {
    vs: VarStore,
    net: nn::Linear,
}

impl TrainTask for FullTask {
    fn parameters(&self) -> Vec<(String, Tensor)> {
        full_parameters(&self.vs, softalign_core::dtype::DType::F32, &[]).unwrap()
    }
    fn micro_step(&mut self, m: &MicroStep) -> Result<BTreeMap<String, f64>> {
        let x = Tensor::randn([16, 3], (Kind::Float, Device::Cpu));
        let target = x.sum_dim_intlist(-1, true, Kind::Float) * 2.0;
        let loss = (self.net.forward(&x) - target).square().mean(Kind::Float);
        (&loss * m.loss_scale).backward();
        Ok(BTreeMap::from([(
            "loss".to_string(),
            loss.double_value(&[]),
        )]))
    }
    fn export(&self, dir: &Path, _step: u64) -> Result<()> {
        std::fs::create_dir_all(dir).unwrap();
        self.vs.save(dir.join("model.safetensors"))?;
        Ok(())
    }
}

#[test]
fn full_parameter_mode_trains_the_backbone_weights() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    seed_everything(SEED);
    let mut vs = VarStore::new(Device::Cpu);
    let net = nn::linear(vs.root() / "proj", 3, 1, Default::default());
    vs.freeze();
    let mut task = FullTask { vs, net };
    let cfg: TrainConfig = toml::from_str(
        "steps = 100\nlr = 0.1\nmode = \"full\"\noptimizer = { betas = [0.9, 0.999], eps = 1e-8, weight_decay = 0.0 }",
    )
    .unwrap();
    assert_eq!(cfg.mode, TrainMode::Full);
    let s = train(&cfg, &quiet_logging(), options(tmp.path()), &mut task).unwrap();
    let m = metrics(tmp.path());
    let first = m[0]["loss"].as_f64().unwrap();
    assert!(
        s.last_loss.unwrap() < first * 0.1,
        "loss {first} -> {:?}",
        s.last_loss
    );
    let w = task.net.ws.flatten(0, -1);
    assert!(
        (w - 2.0).abs().max().double_value(&[]) < 0.3,
        "weights move towards 2"
    );
    assert!(tmp.path().join("final/model.safetensors").is_file());
}

/// A stop request (what `softalign train`'s signal handlers raise) ends the run after the step
/// in progress with a checkpoint of it, even off the `checkpoint.every` grid, and a marker;
/// resuming, stopped again, and resumed to the end gives the uninterrupted tensors. A run
/// started while `checkpoint.every` defaulted to 0 resumes under the new default.
#[test]
fn a_stop_request_checkpoints_the_step_and_the_resumed_run_is_exact() {
    use softalign_core::train::preempt::{read_marker, MARKER_FILE};
    use softalign_core::train::StopFlag;
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let run = tmp.path().join("run");
    let cfg = config(12);
    train(
        &cfg,
        &quiet_logging(),
        options(&straight),
        &mut ToyTask::new(),
    )
    .unwrap();

    // The recipe JSON as the old default resolved it, then as the new one does.
    let recipe = |every: u64| serde_json::json!({"train": {"checkpoint": {"every": every}}});
    let stopped = |resume: bool, every: u64| {
        let mut o = options(&run);
        o.recipe = recipe(every);
        let flag = StopFlag::new();
        flag.request(15);
        o.stop = Some(flag);
        o.resume = resume.then_some(ResumeFrom::Latest);
        train(&cfg, &quiet_logging(), o, &mut ToyTask::new()).unwrap()
    };
    let first = stopped(false, 0);
    let p = first.preempted.expect("the run stops");
    assert_eq!(p.step, 1, "stops after the step it was in");
    assert_eq!(read_marker(&run).unwrap(), Some(p.clone()));
    assert!(p.checkpoint.ends_with("step-00000001") && p.checkpoint.is_dir());
    assert!(!run.join("final").exists());
    let second = stopped(true, 500);
    assert_eq!(second.start_step, 1);
    assert_eq!(second.preempted.unwrap().step, 2);

    // Another checkpoint interval is a changed recipe, as before.
    let mut o = options(&run);
    o.recipe = recipe(7);
    o.resume = Some(ResumeFrom::Latest);
    let err = train(&cfg, &quiet_logging(), o, &mut ToyTask::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("different recipe"), "{err}");
    assert!(
        read_marker(&run).unwrap().is_some(),
        "a refused resume keeps the marker"
    );

    let mut o = options(&run);
    o.recipe = recipe(500);
    o.resume = Some(ResumeFrom::Latest);
    let done = train(&cfg, &quiet_logging(), o, &mut ToyTask::new()).unwrap();
    assert!(done.preempted.is_none());
    assert!(
        !run.join(MARKER_FILE).exists(),
        "the marker outlived the resume"
    );
    for file in ["final/adapter.safetensors", "final-ema/adapter.safetensors"] {
        let (a, b) = (
            tensor_bytes(&straight.join(file)),
            tensor_bytes(&run.join(file)),
        );
        assert!(a == b, "{file} differs after two stops");
    }
}
