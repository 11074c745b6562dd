//! Loss terms and the step context they share: SoftREPA's contrastive loss, the plain
//! denoising / flow-matching loss, AGSM, the counting term, Diffusion-DPO; DDPO's advantages
//! and PPO loss and the rewards for RL fine-tuning; and the train task that drives them.
pub mod agsm;
pub mod batch;
pub mod caption_count;
pub mod contrastive;
pub mod counting;
pub mod ddpo;
pub mod ddpo_task;
pub mod diffusion_dpo;
pub mod dsm;
pub mod rewards;
pub mod step;
pub mod task;
pub mod underflow;
mod util;

pub use ddpo_task::{DdpoParts, DdpoTask};
pub use step::{StepContext, StepInputs, StepOptions, StepResult};
pub use task::{evaluate, ObjectiveTask};
