//! GenEval's file formats and judging rules, independent of any detector: prompt metadata
//! lines, the generation folder layout, per-image results and the summary. A world supplies
//! detections; these modules judge and report them as GenEval would.
pub mod folder;
pub mod judge;
pub mod metadata;
pub mod results;
pub mod summary;

pub use folder::{
    prompt_dir, read_geneval_folder, write_geneval_folder, write_prompt_samples, PromptFolder,
};
pub use judge::{judge, relative_position, Detection, JudgeConfig, Judgement};
pub use metadata::{
    read_metadata_jsonl, write_metadata_jsonl, EvalPrompt, Exclusion, Relation, Requirement, Tag,
};
pub use results::{read_results_jsonl, score_folder_with, write_results_jsonl, ImageResult};
pub use summary::{split_held_out, wilson_interval, Summary, TagScore};
