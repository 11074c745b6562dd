//! The trainer: the loop on a toy task, schedules and AdamW against torch, the W&B bridge and
//! `softalign train` end to end (stopped by signals, locked against a second writer), as one
//! test binary (each binary links libtorch and the
//! workspace again, which CI pays for in build time).
mod data_parallel;
mod ddpo_cli;
mod preempt_cli;
mod run_lock_cli;
mod train_cli;
mod trainer_loop;
mod trainer_torch_parity;
mod trainer_wandb;
