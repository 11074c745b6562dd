//! Progress bars for the long loops of `sample`, `eval` and `demo` (hidden with `--quiet`).
use indicatif::{ProgressBar, ProgressStyle};

pub fn bar(len: u64, what: &str, unit: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{prefix:>12}} {{bar:30}} {{pos}}/{{len}} {unit} [{{elapsed}}<{{eta}}]"
        ))
        .expect("valid template"),
    );
    pb.set_prefix(what.to_string());
    pb
}
