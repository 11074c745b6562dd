//! The demo's comparison table (category x model, accuracy with Wilson 95% intervals) as
//! aligned text and as Markdown, and the run folder's `report.md`. Plain data in, text out:
//! no tensors here, so tests can include this file on its own.
use softalign_worlds::geneval::{Summary, Tag};

/// One evaluated model: its column name and GenEval summary.
pub struct Column<'a> {
    pub name: &'a str,
    pub summary: &'a Summary,
}

/// `62.5% [40.9, 80.0]`: accuracy and its interval, in percent.
pub fn cell(acc: f64, ci: [f64; 2]) -> String {
    format!(
        "{:.1}% [{:.1}, {:.1}]",
        100.0 * acc,
        100.0 * ci[0],
        100.0 * ci[1]
    )
}

/// Rows: every category any model was scored on (GenEval's order), then the overall score
/// (the mean of the category accuracies). Each row: the category, its image count per model
/// (`n`), and one cell per model (`-` where the model has no images in that category).
pub fn rows(cols: &[Column<'_>]) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for tag in Tag::ALL {
        let scores: Vec<_> = cols
            .iter()
            .map(|c| c.summary.tags.iter().find(|t| t.tag == tag))
            .collect();
        if scores.iter().all(Option::is_none) {
            continue;
        }
        let mut ns: Vec<usize> = scores.iter().flatten().map(|t| t.total).collect();
        ns.dedup();
        let n = ns
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("/");
        let cells = scores
            .iter()
            .map(|s| s.map_or("-".into(), |t| cell(t.accuracy, t.ci95)))
            .collect();
        out.push((tag.name().to_string(), n, cells));
    }
    let n = cols
        .first()
        .map_or(0, |c| c.summary.total_images)
        .to_string();
    out.push((
        "overall".into(),
        n,
        cols.iter()
            .map(|c| cell(c.summary.overall, c.summary.overall_ci95))
            .collect(),
    ));
    out
}

/// The table as aligned text for the terminal.
pub fn text_table(cols: &[Column<'_>]) -> String {
    let rows = rows(cols);
    let mut header = vec!["category".to_string(), "n".to_string()];
    header.extend(cols.iter().map(|c| c.name.to_string()));
    let lines: Vec<Vec<String>> = std::iter::once(header)
        .chain(rows.into_iter().map(|(tag, n, cells)| {
            let mut l = vec![tag, n];
            l.extend(cells);
            l
        }))
        .collect();
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for (k, l) in lines.iter().enumerate() {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        s += cells.join("  ").trim_end();
        s += "\n";
        if k == 0 {
            s += &"-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1));
            s += "\n";
        }
    }
    s
}

/// The table in Markdown.
pub fn markdown_table(cols: &[Column<'_>]) -> String {
    let mut s = String::from("| category | n |");
    for c in cols {
        s += &format!(" {} |", c.name);
    }
    s += "\n|---|---:|";
    s += &"---:|".repeat(cols.len());
    s += "\n";
    for (tag, n, cells) in rows(cols) {
        let tag = if tag == "overall" {
            "**overall** (mean of categories)".to_string()
        } else {
            tag
        };
        s += &format!("| {tag} | {n} | {} |\n", cells.join(" | "));
    }
    s
}

/// Everything `report.md` says besides the table.
pub struct ReportInput<'a> {
    pub cols: &'a [Column<'a>],
    /// (setting, value) lines: model, recipes, steps, seeds, ...
    pub settings: &'a [(String, String)],
    /// (phase, seconds) wall times.
    pub timings: &'a [(String, f64)],
    /// (grid file, caption).
    pub grids: &'a [(String, String)],
    /// Prompts shown in the grids' rows, top to bottom.
    pub grid_prompts: &'a [String],
    /// Per compared model: the paired rows against the base.
    pub paired: &'a [(String, Vec<super::paired::PairedRow>)],
}

pub fn report_markdown(r: &ReportInput<'_>) -> String {
    let mut s = String::from("# softalign demo: soft tokens on the shapes world\n\n");
    s += "## What was measured\n\n";
    s += "Each model generated the same number of images for every held-out evaluation prompt \
          of the shapes world (GenEval's six categories), from the same noise seeds: image k of \
          prompt p starts from the same noise for every model. The shapes world's exact scorer \
          judged each image by GenEval's rules. Accuracy is the fraction of images judged \
          correct; the interval is Wilson's 95% score interval over images. Images of one \
          prompt are not independent, so the intervals are somewhat too narrow; the overall \
          score is the mean of the category accuracies (GenEval's), with a normal interval. \
          Overlapping intervals alone do not rule an effect out: because every model starts \
          from the same noise, the paired comparison below counts the images a model fixed \
          and broke relative to the base, with the exact McNemar test (two-sided).\n\n";
    s += "## Results\n\n";
    s += &markdown_table(r.cols);
    if !r.paired.is_empty() {
        s += "\n## Paired against the base\n\n";
        for (name, rows) in r.paired {
            s += &super::paired::markdown(name, rows);
            s += "\n";
        }
    }
    s += "\n## Settings\n\n";
    for (k, v) in r.settings {
        s += &format!("- {k}: {v}\n");
    }
    s += "\n## Wall time\n\n| phase | seconds |\n|---|---:|\n";
    for (k, v) in r.timings {
        s += &format!("| {k} | {v:.1} |\n");
    }
    if !r.grids.is_empty() {
        s += "\n## Grids\n\n";
        for (file, caption) in r.grids {
            s += &format!("![{caption}]({file})\n\n{caption}\n\n");
        }
        s += "Rows, top to bottom:\n\n";
        for (i, p) in r.grid_prompts.iter().enumerate() {
            s += &format!("{}. {p}\n", i + 1);
        }
    }
    s
}
