//! Checkpoints: `run_dir/checkpoints/step-{:08}` folders, each written into a temporary
//! sibling and renamed into place, so a folder under a final name is always complete.
//! `checkpoints/latest` (a relative symlink on Unix, a one-line file elsewhere) names the
//! newest one and is swapped atomically; only the newest `keep` folders are kept.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::tensors::{save_safetensors, MappedSafetensors};
use crate::{Error, Result};

pub const PARAMS_FILE: &str = "params.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const EXTRA_FILE: &str = "extra_state.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const LATEST: &str = "latest";

/// Where `--resume` continues from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeFrom {
    /// `run_dir/checkpoints/latest`.
    Latest,
    /// A checkpoint folder.
    Dir(PathBuf),
}

impl ResumeFrom {
    /// `latest` or a folder path, as written on the command line.
    pub fn parse(s: &str) -> Self {
        if s == LATEST {
            ResumeFrom::Latest
        } else {
            ResumeFrom::Dir(PathBuf::from(s))
        }
    }
}

/// The trainer's scalars, saved as state.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointState {
    /// Optimizer steps completed (skipped ones included).
    pub step: u64,
    pub seed: u64,
    /// Consecutive non-finite steps just before this checkpoint.
    pub bad_steps_in_row: u32,
    /// Non-finite steps skipped so far in the run.
    pub skipped_steps: u64,
    /// sha256 of the resolved recipe the run was started with.
    pub recipe_hash: String,
    pub softalign_version: String,
    /// Ranks that trained up to here (1: a single process).
    #[serde(default = "one")]
    pub world_size: u32,
    /// Micro-batches per optimizer step over all ranks (world size x grad_accum): a resume
    /// that keeps this number draws exactly the data an uninterrupted run would have.
    #[serde(default)]
    pub micro_batches_per_step: Option<u32>,
}

fn one() -> u32 {
    1
}

/// What goes into one checkpoint.
pub struct CheckpointContents<'a> {
    pub state: CheckpointState,
    pub params: &'a [(String, Tensor)],
    pub optimizer: Vec<(String, Tensor)>,
    pub extra: Vec<(String, Tensor)>,
    pub ema: Option<&'a [(String, Tensor)]>,
}

/// A checkpoint read back.
pub struct LoadedCheckpoint {
    pub dir: PathBuf,
    pub state: CheckpointState,
    pub params: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
    pub extra: BTreeMap<String, Tensor>,
    pub ema: Option<BTreeMap<String, Tensor>>,
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.len() >= 8 && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()
    } else {
        None
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::file(path, e)
}

/// The complete checkpoint folders of a run, oldest first.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = checkpoints_dir(run_dir);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
        let entry = entry.map_err(io(&dir))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(parse_step_dir) else {
            continue;
        };
        let path = entry.path();
        if path.is_dir() && !path.is_symlink() {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Removes leftovers of a process killed while writing (temporary folders; never a complete
/// checkpoint).
pub fn remove_partial(run_dir: &Path) -> Result<()> {
    let dir = checkpoints_dir(run_dir);
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
        let entry = entry.map_err(io(&dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-") || name.starts_with(".trash-") {
            let p = entry.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).map_err(io(&p))?;
            } else {
                std::fs::remove_file(&p).map_err(io(&p))?;
            }
        }
    }
    Ok(())
}

fn fsync_dir(dir: &Path) {
    // Directory fsync makes the rename durable; not every platform allows opening a folder,
    // and durability (unlike atomicity) is best-effort here.
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Writes a checkpoint for `contents.state.step`, points `latest` at it and deletes all but
/// the newest `keep` checkpoints. Returns the new folder.
///
/// A write that fails (a full disk, an I/O error, a read-only folder) leaves the previous
/// checkpoint and `latest` as they were, removes what it had written, and returns an error
/// naming the file, the OS error and the checkpoint `latest` still names.
pub fn write_checkpoint(
    run_dir: &Path,
    contents: &CheckpointContents<'_>,
    keep: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    let step = contents.state.step;
    let previous = latest(run_dir).ok().flatten();
    let not_written = |e: Error| not_written(e, step, previous.as_deref());
    std::fs::create_dir_all(&root)
        .map_err(io(&root))
        .map_err(not_written)?;
    let name = step_dir_name(step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if let Err(e) = write_folder(&tmp, contents) {
        // What the failed write took (on a full disk, the space the next try needs) is freed
        // now rather than by the next run's clean-up.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(not_written(e));
    }
    let final_dir = root.join(&name);
    if let Err(e) = publish(&root, &tmp, &final_dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(not_written(e));
    }
    set_latest(&root, &name).map_err(not_written)?;
    fsync_dir(&root);
    rotate(run_dir, keep, step)?;
    Ok(final_dir)
}

/// Every file of a checkpoint, into the temporary folder `tmp`.
fn write_folder(tmp: &Path, contents: &CheckpointContents<'_>) -> Result<()> {
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).map_err(io(tmp))?;
    }
    std::fs::create_dir(tmp).map_err(io(tmp))?;
    save(&tmp.join(PARAMS_FILE), contents.params)?;
    save(&tmp.join(OPTIMIZER_FILE), &contents.optimizer)?;
    save(&tmp.join(EXTRA_FILE), &contents.extra)?;
    if let Some(ema) = contents.ema {
        save(&tmp.join(EMA_FILE), ema)?;
    }
    let json = serde_json::to_vec_pretty(&contents.state)
        .map_err(|e| Error::file(tmp.join(STATE_FILE), e))?;
    crate::tensors::write_atomic(&tmp.join(STATE_FILE), &json)?;
    fsync_dir(tmp);
    Ok(())
}

/// Renames the complete folder `tmp` to `final_dir`.
fn publish(root: &Path, tmp: &Path, final_dir: &Path) -> Result<()> {
    if !final_dir.exists() {
        return std::fs::rename(tmp, final_dir).map_err(io(final_dir));
    }
    // A run killed between this rename and the `latest` swap left a complete folder for this
    // step; the resumed run recomputed it (identically) and replaces it. It is set aside
    // until the new one is in place, and put back if that fails.
    let name = final_dir.file_name().unwrap_or_default().to_string_lossy();
    let trash = root.join(format!(".trash-{name}-{}", std::process::id()));
    std::fs::rename(final_dir, &trash).map_err(io(final_dir))?;
    if let Err(e) = std::fs::rename(tmp, final_dir) {
        let _ = std::fs::rename(&trash, final_dir);
        return Err(Error::file(final_dir, e));
    }
    std::fs::remove_dir_all(&trash).map_err(io(&trash))
}

/// `e`, saying that checkpoint `step` was not written and which one `latest` still names.
fn not_written(e: Error, step: u64, previous: Option<&Path>) -> Error {
    let kept = match previous.and_then(Path::file_name) {
        Some(p) => format!("`latest` still names {}", p.to_string_lossy()),
        None => "the run has no earlier checkpoint".to_string(),
    };
    let note = format!("checkpoint step {step} was not written; {kept}");
    match e {
        Error::File { path, msg } => Error::File {
            path,
            msg: format!("{msg} ({note})"),
        },
        other => Error::Invalid(format!("{other} ({note})")),
    }
}

fn set_latest(root: &Path, name: &str) -> Result<()> {
    let latest = root.join(LATEST);
    #[cfg(unix)]
    {
        let tmp = root.join(format!(".tmp-latest-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(name, &tmp).map_err(io(&tmp))?;
        // rename(2) replaces the old link itself (it does not follow it): readers see the
        // old target or the new one.
        std::fs::rename(&tmp, &latest).map_err(io(&latest))
    }
    #[cfg(not(unix))]
    {
        crate::tensors::write_atomic(&latest, name.as_bytes())
    }
}

/// The folder `latest` points to, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let root = checkpoints_dir(run_dir);
    let link = root.join(LATEST);
    let target = match std::fs::read_link(&link) {
        Ok(t) => t,
        Err(_) if link.is_file() => {
            PathBuf::from(std::fs::read_to_string(&link).map_err(io(&link))?.trim())
        }
        Err(_) => return Ok(None),
    };
    Ok(Some(if target.is_absolute() {
        target
    } else {
        root.join(target)
    }))
}

fn rotate(run_dir: &Path, keep: usize, newest: u64) -> Result<()> {
    let all = list_checkpoints(run_dir)?;
    let n = all.len();
    for (step, path) in all.into_iter().take(n.saturating_sub(keep)) {
        if step == newest {
            continue;
        }
        std::fs::remove_dir_all(&path).map_err(io(&path))?;
    }
    Ok(())
}

/// The checkpoint folder a resume request names.
pub fn resolve(run_dir: &Path, from: &ResumeFrom) -> Result<PathBuf> {
    let dir = match from {
        ResumeFrom::Latest => latest(run_dir)?.ok_or_else(|| {
            Error::file(
                checkpoints_dir(run_dir).join(LATEST),
                "cannot resume from `latest`: this run folder has no checkpoint yet",
            )
        })?,
        ResumeFrom::Dir(d) => d.clone(),
    };
    if !dir.join(STATE_FILE).is_file() {
        return Err(Error::file(
            &dir,
            format!("not a checkpoint folder (no {STATE_FILE}); checkpoints are the step-NNNNNNNN folders under a run's checkpoints/"),
        ));
    }
    Ok(dir)
}

/// An empty tensor list is written as no file at all: a safetensors file without tensors
/// does not read back (safetensors 0.6 rejects its header).
fn save(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    if tensors.is_empty() {
        return Ok(());
    }
    save_safetensors(path, tensors, &BTreeMap::new())
}

fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    if !path.exists() {
        return Ok(BTreeMap::new());
    }
    MappedSafetensors::open(path)?.all()
}

/// Reads a whole checkpoint folder (tensors on the CPU).
pub fn read_checkpoint(dir: &Path) -> Result<LoadedCheckpoint> {
    let state_path = dir.join(STATE_FILE);
    let state: CheckpointState = crate::json_file::read(&state_path)?;
    let ema_path = dir.join(EMA_FILE);
    let params_path = dir.join(PARAMS_FILE);
    if !params_path.is_file() {
        return Err(Error::file(&params_path, "missing from the checkpoint"));
    }
    Ok(LoadedCheckpoint {
        dir: dir.to_path_buf(),
        state,
        params: read_tensors(&params_path)?,
        optimizer: read_tensors(&dir.join(OPTIMIZER_FILE))?,
        extra: read_tensors(&dir.join(EXTRA_FILE))?,
        ema: if ema_path.exists() {
            Some(read_tensors(&ema_path)?)
        } else {
            None
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> CheckpointState {
        CheckpointState {
            world_size: 1,
            micro_batches_per_step: Some(1),
            step,
            seed: 1,
            bad_steps_in_row: 0,
            skipped_steps: 0,
            recipe_hash: "h".into(),
            softalign_version: "0".into(),
        }
    }

    #[test]
    fn rotation_keeps_the_newest_and_latest_points_at_it() {
        let run = tempfile::tempdir().unwrap();
        let params = vec![("p".to_string(), Tensor::from_slice(&[1.0f32, 2.0]))];
        for step in [2u64, 4, 6, 8, 10] {
            let c = CheckpointContents {
                state: state(step),
                params: &params,
                optimizer: vec![],
                extra: vec![],
                ema: None,
            };
            write_checkpoint(run.path(), &c, 2).unwrap();
        }
        let steps: Vec<u64> = list_checkpoints(run.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, [8, 10]);
        let l = latest(run.path()).unwrap().unwrap();
        assert_eq!(l.file_name().unwrap(), "step-00000010");
        let names: Vec<String> = std::fs::read_dir(checkpoints_dir(run.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        let back = read_checkpoint(&resolve(run.path(), &ResumeFrom::Latest).unwrap()).unwrap();
        assert_eq!(back.state.step, 10);
        assert!(back.params["p"].equal(&params[0].1));
    }

    #[test]
    fn resume_errors_name_the_folder() {
        let run = tempfile::tempdir().unwrap();
        let err = resolve(run.path(), &ResumeFrom::Latest)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("checkpoints") && err.contains("latest"),
            "{err}"
        );
        let bogus = run.path().join("nowhere");
        let err = resolve(run.path(), &ResumeFrom::Dir(bogus.clone()))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&bogus.display().to_string()), "{err}");
    }

    #[test]
    fn partial_folders_are_cleaned_and_never_listed() {
        let run = tempfile::tempdir().unwrap();
        let root = checkpoints_dir(run.path());
        std::fs::create_dir_all(root.join(".tmp-step-00000004-123")).unwrap();
        assert!(list_checkpoints(run.path()).unwrap().is_empty());
        remove_partial(run.path()).unwrap();
        assert!(!root.join(".tmp-step-00000004-123").exists());
    }
}

/// A real I/O failure, not a simulated one: the write runs in a child process whose file-size
/// limit (RLIMIT_FSIZE) makes the kernel refuse it with EFBIG, which root privileges do not
/// bypass (unlike a read-only folder), with SIGXFSZ ignored so that the write returns the
/// error instead of killing the process. The same paths run on ENOSPC and EIO.
#[cfg(all(test, unix))]
mod io_failure_tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    const CHILD: &str = "SOFTALIGN_TEST_FSIZE_CHILD";
    const NAME: &str =
        "train::checkpoint::io_failure_tests::a_failed_write_keeps_the_previous_checkpoint";

    fn contents(step: u64, params: &[(String, Tensor)]) -> CheckpointContents<'_> {
        CheckpointContents {
            state: CheckpointState {
                world_size: 1,
                micro_batches_per_step: Some(1),
                step,
                seed: 1,
                bad_steps_in_row: 0,
                skipped_steps: 0,
                recipe_hash: "h".into(),
                softalign_version: "0".into(),
            },
            params,
            optimizer: vec![],
            extra: vec![],
            ema: Some(params),
        }
    }

    #[test]
    fn a_failed_write_keeps_the_previous_checkpoint() {
        if let Ok(run) = std::env::var(CHILD) {
            // The child: 1 MB of parameters under a 64 KiB file-size limit.
            let big = vec![(
                "p".to_string(),
                Tensor::zeros([1 << 18], tch::kind::FLOAT_CPU),
            )];
            let err = write_checkpoint(Path::new(&run), &contents(4, &big), 3)
                .unwrap_err()
                .to_string();
            println!("ERROR: {err}");
            return;
        }
        let run = tempfile::tempdir().unwrap();
        let small = vec![("p".to_string(), Tensor::from_slice(&[1.0f32, 2.0, 3.0]))];
        write_checkpoint(run.path(), &contents(2, &small), 3).unwrap();
        let out = unsafe {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD, run.path())
                .pre_exec(|| {
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    let lim = libc::rlimit {
                        rlim_cur: 64 << 10,
                        rlim_max: 64 << 10,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
                .output()
                .unwrap()
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = stdout
            .lines()
            .find_map(|l| l.split_once("ERROR: ").map(|(_, e)| e))
            .unwrap_or_else(|| panic!("the child wrote no error: {stdout}"));
        // The file, the OS error, and what is still there.
        assert!(err.contains(PARAMS_FILE), "{err}");
        assert!(err.contains("os error 27"), "{err}");
        assert!(err.contains("checkpoint step 4 was not written"), "{err}");
        assert!(err.contains("`latest` still names step-00000002"), "{err}");
        // The previous checkpoint is `latest`, loads, and nothing of the failed one is left.
        let back = read_checkpoint(&resolve(run.path(), &ResumeFrom::Latest).unwrap()).unwrap();
        assert_eq!(back.state.step, 2);
        assert!(back.params["p"].equal(&small[0].1));
        let names: Vec<String> = std::fs::read_dir(checkpoints_dir(run.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
