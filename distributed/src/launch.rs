//! Who this process is in a data-parallel launch, read from the environment the launcher sets:
//! torchrun (and torch.distributed.run / elastic agents) or Slurm's srun.
use std::collections::HashMap;
use std::time::Duration;

use softalign_core::{Error, Result};

/// The rendezvous facts of one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// This rank's index on its node (selects its CUDA device).
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent already serves the store on MASTER_PORT, so rank 0 is a client too.
    pub agent_store: bool,
    /// Which launcher's variables these came from, for messages.
    pub launcher: &'static str,
    /// How long a collective or the rendezvous may wait for a peer.
    pub timeout: Duration,
}

/// Default collective timeout: long enough for rank 0 to write a checkpoint of a full model
/// while the others wait in the next all-reduce.
pub const DEFAULT_TIMEOUT_S: u64 = 1800;

impl Launch {
    /// Reads the process environment. `None`: no launcher, or a world of one (train alone).
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(&std::env::vars().collect())
    }

    /// [`Launch::from_env`] over an explicit set of variables.
    pub fn from_vars(v: &HashMap<String, String>) -> Result<Option<Launch>> {
        let timeout = match v.get("SOFTALIGN_DIST_TIMEOUT_S") {
            Some(s) => Duration::from_secs_f64(parse::<f64>("SOFTALIGN_DIST_TIMEOUT_S", s)?),
            None => Duration::from_secs(DEFAULT_TIMEOUT_S),
        };
        // torchrun first: `srun ... torchrun` sets both, and torchrun's ranks are the real ones.
        if v.contains_key("WORLD_SIZE") || v.contains_key("RANK") {
            let world: usize = need(v, "WORLD_SIZE", "torchrun")?;
            if world <= 1 {
                return Ok(None);
            }
            let rank: usize = need(v, "RANK", "torchrun")?;
            let local_rank = match v.get("LOCAL_RANK") {
                Some(s) => parse("LOCAL_RANK", s)?,
                None => rank,
            };
            let agent_store = v
                .get("TORCHELASTIC_USE_AGENT_STORE")
                .is_some_and(|s| s.eq_ignore_ascii_case("true") || s == "1");
            return Launch {
                rank,
                world,
                local_rank,
                master_addr: need(v, "MASTER_ADDR", "torchrun")?,
                master_port: need(v, "MASTER_PORT", "torchrun")?,
                agent_store,
                // torchrun's agent sets TORCHELASTIC_*; plain RANK/WORLD_SIZE is env:// by hand.
                launcher: if v.keys().any(|k| k.starts_with("TORCHELASTIC_")) {
                    "torchrun"
                } else {
                    "env"
                },
                timeout,
            }
            .checked();
        }
        // srun sets SLURM_STEP_NUM_TASKS for the tasks of this step; an sbatch script run
        // without srun has only the allocation's SLURM_NTASKS and is one process.
        if let Some(n) = v.get("SLURM_STEP_NUM_TASKS") {
            let world: usize = parse("SLURM_STEP_NUM_TASKS", n)?;
            if world <= 1 {
                return Ok(None);
            }
            let rank: usize = need(v, "SLURM_PROCID", "srun")?;
            let local_rank: usize = need(v, "SLURM_LOCALID", "srun")?;
            let master_addr = match v.get("MASTER_ADDR") {
                Some(a) => a.clone(),
                None => {
                    let list = v
                        .get("SLURM_STEP_NODELIST")
                        .or_else(|| v.get("SLURM_JOB_NODELIST"));
                    let list = list.ok_or_else(|| {
                        Error::invalid(
                            "srun launch: neither MASTER_ADDR nor SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is set; export MASTER_ADDR",
                        )
                    })?;
                    first_host(list).ok_or_else(|| {
                        Error::invalid(format!(
                            "srun launch: cannot read the first host of the node list `{list}`; export MASTER_ADDR"
                        ))
                    })?
                }
            };
            // One port per job, so two jobs sharing a node do not meet each other's store.
            let master_port = match v.get("MASTER_PORT") {
                Some(p) => parse("MASTER_PORT", p)?,
                None => {
                    let job: u64 = need(v, "SLURM_JOB_ID", "srun")?;
                    20000 + (job % 20000) as u16
                }
            };
            return Launch {
                rank,
                world,
                local_rank,
                master_addr,
                master_port,
                agent_store: false,
                launcher: "srun",
                timeout,
            }
            .checked();
        }
        Ok(None)
    }

    fn checked(self) -> Result<Option<Launch>> {
        if self.rank >= self.world {
            return Err(Error::invalid(format!(
                "{} launch: rank {} is not below the world size {}",
                self.launcher, self.rank, self.world
            )));
        }
        Ok(Some(self))
    }
}

fn parse<T: std::str::FromStr>(name: &str, s: &str) -> Result<T> {
    s.trim().parse().map_err(|_| {
        Error::invalid(format!(
            "environment variable {name}=`{s}` is not a valid {}",
            std::any::type_name::<T>()
        ))
    })
}

fn need<T: std::str::FromStr>(
    v: &HashMap<String, String>,
    name: &str,
    launcher: &str,
) -> Result<T> {
    let s = v.get(name).ok_or_else(|| {
        Error::invalid(format!(
            "{launcher} launch: environment variable {name} is not set"
        ))
    })?;
    parse(name, s)
}

/// The first host of a Slurm node list: `gpu[03-05,09],cpu1` gives `gpu03`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..end];
    if list[end..].starts_with('[') {
        let inner = &list[end + 1..];
        let first = inner.split([',', '-', ']']).next()?;
        if first.is_empty() || prefix.is_empty() && first.is_empty() {
            return None;
        }
        return Some(format!("{prefix}{first}"));
    }
    (!prefix.is_empty()).then(|| prefix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_launcher_or_one_rank_trains_alone() {
        assert_eq!(Launch::from_vars(&vars(&[])).unwrap(), None);
        assert_eq!(
            Launch::from_vars(&vars(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(),
            None
        );
        assert_eq!(
            Launch::from_vars(&vars(&[("SLURM_NTASKS", "8"), ("SLURM_PROCID", "0")])).unwrap(),
            None,
            "an sbatch script without srun is one process"
        );
    }

    #[test]
    fn torchrun_variables() {
        let l = Launch::from_vars(&vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (l.rank, l.world, l.local_rank, l.master_port),
            (1, 2, 1, 29500)
        );
        assert!(l.agent_store);
        assert_eq!(l.launcher, "torchrun");
    }

    #[test]
    fn srun_variables_and_node_lists() {
        let l = Launch::from_vars(&vars(&[
            ("SLURM_STEP_NUM_TASKS", "4"),
            ("SLURM_PROCID", "3"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_ID", "123456"),
            ("SLURM_STEP_NODELIST", "gpu[07-08]"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world, l.local_rank), (3, 4, 1));
        assert_eq!(l.master_addr, "gpu07");
        assert_eq!(l.master_port, 20000 + (123456 % 20000) as u16);
        assert!(!l.agent_store);
        assert_eq!(first_host("a1,b2").as_deref(), Some("a1"));
        assert_eq!(first_host("n[1,3-4],m").as_deref(), Some("n1"));
        assert_eq!(first_host("").as_deref(), None);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = Launch::from_vars(&vars(&[("WORLD_SIZE", "two"), ("RANK", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("WORLD_SIZE") && e.contains("two"), "{e}");
        let e = Launch::from_vars(&vars(&[("WORLD_SIZE", "2"), ("RANK", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let e = Launch::from_vars(&vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("rank 2"), "{e}");
    }
}
