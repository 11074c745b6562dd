//! The shapes demo's commands end to end on tiny models (`sample`, `eval`, `eval-edit`,
//! `demo`) and its report, as one test binary: each binary links libtorch and the workspace
//! again, which CI pays for in build time.
mod common;
mod eval;
#[path = "../../src/cli/paired.rs"]
mod paired;
#[path = "../../src/cli/report.rs"]
mod report;
mod report_tables;
mod run;
mod sample;
mod study;
