//! The W&B sink's bridge, with a fake `wandb` module on PYTHONPATH (happy path) and with one
//! whose import fails (the missing-client error).
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use softalign_core::logging::{WandbConfig, WandbMode, WandbSink};
use softalign_core::metrics::MetricsSink;

fn python() -> Command {
    Command::new(std::env::var("SOFTALIGN_PYTHON").unwrap_or_else(|_| "python3".into()))
}

fn config() -> WandbConfig {
    WandbConfig {
        project: "softalign-tests".into(),
        entity: Some("lab".into()),
        name: None,
        mode: WandbMode::Offline,
        tags: vec!["toy".into()],
        python: None,
    }
}

fn fake_module(dir: &Path, body: &str) {
    std::fs::create_dir_all(dir.join("wandb")).unwrap();
    std::fs::write(dir.join("wandb/__init__.py"), body).unwrap();
}

const RECORDING_WANDB: &str = r#"
import json, os
_log = os.environ["FAKE_WANDB_LOG"]
def _rec(kind, **kw):
    with open(_log, "a") as f:
        f.write(json.dumps({"call": kind, **kw}) + "\n")
class _Run:
    def finish(self):
        _rec("finish")
def init(**kw):
    _rec("init", kwargs=kw)
    return _Run()
def log(values, step=None):
    # NaN recorded as the string "nan" (it must reach wandb as a float NaN).
    _rec("log", values={k: ("nan" if isinstance(v, float) and v != v else v) for k, v in values.items()}, step=step)
def finish():
    _rec("finish")
"#;

#[test]
fn bridge_forwards_init_log_and_finish_to_the_client() {
    let tmp = tempfile::tempdir().unwrap();
    let modules = tmp.path().join("modules");
    fake_module(&modules, RECORDING_WANDB);
    let run_dir = tmp.path().join("run-7");
    std::fs::create_dir_all(&run_dir).unwrap();
    let calls = tmp.path().join("calls.jsonl");
    let mut cmd = python();
    cmd.env("PYTHONPATH", &modules)
        .env("FAKE_WANDB_LOG", &calls);
    let recipe = serde_json::json!({"train": {"steps": 2, "lr": 0.001}});
    let mut sink = WandbSink::start_with(cmd, &config(), &run_dir, &recipe).unwrap();
    sink.log(
        1,
        &BTreeMap::from([("loss".to_string(), 0.5), ("lr".to_string(), 1e-3)]),
    )
    .unwrap();
    sink.log(2, &BTreeMap::from([("loss".to_string(), f64::NAN)]))
        .unwrap();
    sink.finish().unwrap();

    let got: Vec<serde_json::Value> = std::fs::read_to_string(&calls)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = got.iter().map(|v| v["call"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["init", "log", "log", "finish"]);
    let init = &got[0]["kwargs"];
    assert_eq!(init["project"], "softalign-tests");
    assert_eq!(init["entity"], "lab");
    assert_eq!(init["mode"], "offline");
    assert_eq!(init["name"], "run-7", "defaults to the run folder's name");
    assert_eq!(init["config"], recipe);
    assert_eq!(init["tags"], serde_json::json!(["toy"]));
    assert_eq!(init["dir"], run_dir.display().to_string());
    assert_eq!(got[1]["step"], 1);
    assert_eq!(got[1]["values"]["loss"], 0.5);
    assert_eq!(got[2]["step"], 2);
    // NaN travels as null over JSON and reaches wandb as a float NaN again.
    assert_eq!(got[2]["values"]["loss"], "nan");
    // The bridge is kept in the run folder, and the W&B run id for a later resume.
    assert!(run_dir.join("wandb_bridge.py").is_file());
    let id = std::fs::read_to_string(run_dir.join("wandb_run_id")).unwrap();
    assert_eq!(init["id"], id.trim());
}

#[test]
fn missing_wandb_client_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let modules = tmp.path().join("modules");
    // Shadows any installed wandb: this interpreter cannot import it.
    fake_module(
        &modules,
        "raise ModuleNotFoundError(\"No module named 'wandb'\")\n",
    );
    let mut cmd = python();
    cmd.env("PYTHONPATH", &modules);
    let err = WandbSink::start_with(cmd, &config(), tmp.path(), &serde_json::Value::Null)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("needs the `wandb` Python client"), "{err}");
    assert!(err.contains("pip install wandb"), "{err}");
    assert!(err.contains("No module named 'wandb'"), "{err}");
}

#[test]
fn missing_interpreter_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.python = Some("/nonexistent/python-for-wandb".into());
    let err = WandbSink::start(&cfg, tmp.path(), &serde_json::Value::Null)
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("/nonexistent/python-for-wandb") && err.contains("logging.wandb.python"),
        "{err}"
    );
}

/// One parameter fitted to a random target: enough to drive the trainer.
struct Tiny {
    w: tch::Tensor,
}

impl softalign_core::train::TrainTask for Tiny {
    fn parameters(&self) -> Vec<(String, tch::Tensor)> {
        vec![("w".into(), self.w.shallow_clone())]
    }
    fn micro_step(
        &mut self,
        m: &softalign_core::train::MicroStep,
    ) -> softalign_core::Result<BTreeMap<String, f64>> {
        let target = tch::Tensor::randn([3], (tch::Kind::Float, tch::Device::Cpu));
        let loss = (&self.w - target).square().mean(tch::Kind::Float);
        (&loss * m.loss_scale).backward();
        Ok(BTreeMap::from([(
            "loss".to_string(),
            loss.double_value(&[]),
        )]))
    }
    fn export(&self, _dir: &Path, _step: u64) -> softalign_core::Result<()> {
        Ok(())
    }
}

#[test]
fn train_logs_every_step_to_wandb_as_to_metrics_jsonl() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let modules = tmp.path().join("modules");
    fake_module(&modules, RECORDING_WANDB);
    let calls = tmp.path().join("calls.jsonl");
    // logging.wandb.python pointing at a wrapper: the environment reaches only the bridge.
    let wrapper = tmp.path().join("python-with-wandb");
    let real = python().get_program().to_string_lossy().into_owned();
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nPYTHONPATH='{}' FAKE_WANDB_LOG='{}' exec '{real}' \"$@\"\n",
            modules.display(),
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let logging: softalign_core::logging::LoggingConfig = toml::from_str(&format!(
        "progress = false\n[wandb]\nproject = \"p\"\nmode = \"offline\"\npython = \"{}\"\n",
        wrapper.display()
    ))
    .unwrap();
    let cfg: softalign_core::train::TrainConfig =
        toml::from_str("steps = 4\nlr = 0.1\nlog_every = 2").unwrap();
    let run = tmp.path().join("run");
    let mut opts = softalign_core::train::TrainerOptions::new(&run, 5);
    opts.progress = false;
    opts.recipe = serde_json::json!({"train": {"steps": 4}});
    let mut task = Tiny {
        w: tch::Tensor::zeros([3], (tch::Kind::Float, tch::Device::Cpu)).set_requires_grad(true),
    };
    softalign_core::train::train(&cfg, &logging, opts, &mut task).unwrap();
    let got: Vec<serde_json::Value> = std::fs::read_to_string(&calls)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> = got
        .iter()
        .filter(|v| v["call"] == "log")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [2, 4]);
    assert_eq!(
        got[0]["kwargs"]["config"],
        serde_json::json!({"train": {"steps": 4}})
    );
    assert_eq!(got.last().unwrap()["call"], "finish");
    let jsonl = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
    let logged = &got[1]["values"];
    assert_eq!(logged["loss"], first["loss"]);
    assert_eq!(logged["lr"], first["lr"]);
}
