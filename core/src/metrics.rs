//! Where training metrics go. The run folder's metrics.jsonl is always written; other sinks
//! (W&B) are optional.
use std::collections::BTreeMap;

use crate::Result;

pub trait MetricsSink: Send {
    fn log(&mut self, step: u64, values: &BTreeMap<String, f64>) -> Result<()>;
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
