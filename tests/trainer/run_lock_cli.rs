//! One writer per run folder: while a training writes a folder, a second `train` into it is
//! refused naming the first one's pid; once the first dies (SIGKILL: its lock is stale, the
//! file still names it), a resume takes the folder.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use softalign_core::train::checkpoint;

use super::preempt_cli::{send, wait_for_lines};
use super::train_cli::write_fixture;

/// The long first training must not outlive a failed assertion.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_second_writer_is_refused_and_a_dead_ones_lock_is_taken() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Far more steps than the test waits for: the first training is still running when the
    // second one starts.
    write_fixture(dir, 1_000_000);
    let recipe = dir.join("recipe.toml");
    let run = dir.join("run");
    let train = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_softalign"));
        cmd.arg("train")
            .arg("--recipe")
            .arg(&recipe)
            .arg("--run-dir")
            .arg(&run)
            .arg("--quiet")
            .args(extra);
        cmd
    };
    let mut guard = KillOnDrop(
        train(&[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let first = &mut guard.0;
    // A checkpoint to resume from (one every 2 steps) exists once step 3 is logged.
    wait_for_lines(first, &run, 3);
    assert!(first.try_wait().unwrap().is_none(), "the first run ended");

    let second = train(&["--resume", "latest"]).output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("pid {}", first.id())) && err.contains("another training"),
        "the refusal should name the holder: {err}"
    );
    assert!(
        first.try_wait().unwrap().is_none(),
        "the refusal hurt the first run"
    );

    // A crash: the kernel drops the flock, the lock file still names the dead process.
    send(first, libc::SIGKILL);
    first.wait().unwrap();
    let (step, _) = *checkpoint::list_checkpoints(&run).unwrap().last().unwrap();
    let lock_text = std::fs::read_to_string(run.join("lock")).unwrap();
    assert!(lock_text.contains(&first.id().to_string()), "{lock_text}");

    let t = Instant::now();
    let steps = format!("train.steps={}", step + 2);
    let resumed = train(&[
        "--resume",
        "latest",
        "--set",
        &steps,
        "--allow-recipe-change",
    ])
    .output()
    .unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert!(t.elapsed() < Duration::from_secs(60));
    assert!(run.join("final/adapter.safetensors").exists());
    let lock_text = std::fs::read_to_string(run.join("lock")).unwrap();
    assert!(
        !lock_text.contains(&format!("\"pid\":{}", first.id())),
        "{lock_text}"
    );
}
