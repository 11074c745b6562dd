//! Maps an error in the merged recipe back to the file and line a user wrote.
use std::ops::Range;
use std::path::PathBuf;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::merge::Source;

/// The key path (`objective.1.temperature`) at byte `offset` of `text`.
pub fn path_at(text: &str, offset: usize) -> Vec<String> {
    let Ok(doc) = DeTable::parse(text) else {
        return Vec::new();
    };
    let mut path = Vec::new();
    walk_table(doc.get_ref(), offset, &mut path);
    path
}

fn contains(r: &Range<usize>, off: usize) -> bool {
    r.start <= off && off < r.end.max(r.start + 1)
}

fn walk_table(t: &DeTable<'_>, off: usize, path: &mut Vec<String>) {
    for (k, v) in t.iter() {
        let whole = k.span().start.min(v.span().start)..k.span().end.max(v.span().end);
        if contains(&whole, off) || contains(&k.span(), off) {
            path.push(k.get_ref().to_string());
            walk_value(v, off, path);
            return;
        }
    }
}

fn walk_value(v: &Spanned<DeValue<'_>>, off: usize, path: &mut Vec<String>) {
    match v.get_ref() {
        DeValue::Table(t) => walk_table(t, off, path),
        DeValue::Array(a) => {
            for (i, e) in a.iter().enumerate() {
                if contains(&e.span(), off) {
                    path.push(i.to_string());
                    walk_value(e, off, path);
                    return;
                }
            }
        }
        _ => {}
    }
}

/// The last file of the chain that defines `path` (or its longest defined prefix), with the
/// 1-based line of that definition.
pub fn defined_at(sources: &[Source], path: &[String]) -> Option<(PathBuf, usize)> {
    for n in (1..=path.len()).rev() {
        for src in sources.iter().rev() {
            let Ok(doc) = DeTable::parse(&src.text) else {
                continue;
            };
            if let Some(span) = span_of(doc.get_ref(), &path[..n]) {
                let line = src.text[..span.start.min(src.text.len())]
                    .matches('\n')
                    .count()
                    + 1;
                return Some((src.path.clone(), line));
            }
        }
    }
    None
}

fn span_of(t: &DeTable<'_>, path: &[String]) -> Option<Range<usize>> {
    let (first, rest) = path.split_first()?;
    let (k, v) = t
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == first.as_str())?;
    if rest.is_empty() {
        return Some(k.span());
    }
    match v.get_ref() {
        DeValue::Table(inner) => span_of(inner, rest),
        DeValue::Array(a) => {
            let (idx, rest2) = rest.split_first()?;
            let e = a.get(idx.parse::<usize>().ok()?)?;
            match (e.get_ref(), rest2.is_empty()) {
                (_, true) => Some(e.span()),
                (DeValue::Table(inner), false) => span_of(inner, rest2),
                _ => None,
            }
        }
        _ => None,
    }
}
