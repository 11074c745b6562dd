//! GenEval's prompt metadata: one JSON object per line of `evaluation_metadata.jsonl`, e.g.
//! `{"tag": "position", "include": [{"class": "square", "count": 1}, {"class": "circle",
//! "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a circle left of a square"}`.
//! Field order and names follow GenEval's `create_prompts.py`, so the real prompt file parses
//! with the same types and our files read like theirs.
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// GenEval's six tasks, in the order its paper and `create_prompts.py` list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tag {
    SingleObject,
    TwoObject,
    Counting,
    Colors,
    Position,
    ColorAttr,
}

impl Tag {
    pub const ALL: [Tag; 6] = [
        Tag::SingleObject,
        Tag::TwoObject,
        Tag::Counting,
        Tag::Colors,
        Tag::Position,
        Tag::ColorAttr,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tag::SingleObject => "single_object",
            Tag::TwoObject => "two_object",
            Tag::Counting => "counting",
            Tag::Colors => "colors",
            Tag::Position => "position",
            Tag::ColorAttr => "color_attr",
        }
    }
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where an object must be relative to a target group, as GenEval words it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Relation {
    #[serde(rename = "left of")]
    LeftOf,
    #[serde(rename = "right of")]
    RightOf,
    #[serde(rename = "above")]
    Above,
    #[serde(rename = "below")]
    Below,
}

impl Relation {
    pub const ALL: [Relation; 4] = [
        Relation::LeftOf,
        Relation::RightOf,
        Relation::Above,
        Relation::Below,
    ];

    pub fn phrase(self) -> &'static str {
        match self {
            Relation::LeftOf => "left of",
            Relation::RightOf => "right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    pub fn opposite(self) -> Relation {
        match self {
            Relation::LeftOf => Relation::RightOf,
            Relation::RightOf => Relation::LeftOf,
            Relation::Above => Relation::Below,
            Relation::Below => Relation::Above,
        }
    }
}

/// An `include` clause: at least `count` objects of `class` (the most confident ones), of
/// `color` if given, each at `position.0` relative to every object of include group
/// `position.1` if given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Requirement {
    pub class: String,
    pub count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<(Relation, usize)>,
}

/// An `exclude` clause: fewer than `count` objects of `class`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exclusion {
    pub class: String,
    pub count: u32,
}

/// One GenEval prompt with what a correct image must contain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalPrompt {
    pub tag: Tag,
    pub include: Vec<Requirement>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<Exclusion>,
    pub prompt: String,
    /// Not in GenEval's files: set by the shapes world when the prompt names a combination
    /// the training split never shows. GenEval's own scripts ignore unknown keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out: Option<bool>,
}

impl EvalPrompt {
    /// The prompt as one metadata line, spaced as Python's `json.dumps` writes it.
    pub fn to_json_line(&self) -> String {
        to_python_json(self)
    }

    /// Checks what GenEval's scorer assumes: at least one include clause, positive counts,
    /// and positions that point at an earlier include clause.
    pub fn validate(&self) -> Result<()> {
        if self.include.is_empty() {
            return Err(Error::prompt(&self.prompt, "no include clause"));
        }
        for (i, req) in self.include.iter().enumerate() {
            if req.count == 0 {
                return Err(Error::prompt(
                    &self.prompt,
                    format!("include[{i}] has count 0"),
                ));
            }
            if let Some((_, target)) = req.position {
                if target >= i {
                    return Err(Error::prompt(
                        &self.prompt,
                        format!("include[{i}] is positioned against include[{target}], which does not come before it"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Parses `evaluation_metadata.jsonl` (blank lines skipped); errors name the line.
pub fn parse_metadata_jsonl(text: &str, path: &Path) -> Result<Vec<EvalPrompt>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: EvalPrompt = serde_json::from_str(line).map_err(|e| Error::parse(path, i + 1, e))?;
        p.validate().map_err(|e| Error::parse(path, i + 1, e))?;
        out.push(p);
    }
    Ok(out)
}

pub fn read_metadata_jsonl(path: &Path) -> Result<Vec<EvalPrompt>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_metadata_jsonl(&text, path)
}

pub fn write_metadata_jsonl(path: &Path, prompts: &[EvalPrompt]) -> Result<()> {
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| Error::io(path, e))?);
    for p in prompts {
        writeln!(f, "{}", p.to_json_line()).map_err(|e| Error::io(path, e))?;
    }
    f.flush().map_err(|e| Error::io(path, e))
}

/// Serialises like Python's `json.dumps` with default separators (", " and ": "), which is
/// how GenEval writes metadata and how its summary groups results by prompt.
pub fn to_python_json<T: Serialize + ?Sized>(value: &T) -> String {
    let mut buf = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, PythonFormatter);
    value
        .serialize(&mut ser)
        .expect("serialising plain data to memory cannot fail");
    String::from_utf8(buf).expect("serde_json writes UTF-8")
}

struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as GenEval's own evaluation_metadata.jsonl writes them.
    const GENEVAL_LINES: &str = r#"{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
{"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"}
{"tag": "position", "include": [{"class": "tv", "count": 1}, {"class": "bicycle", "count": 1, "position": ["right of", 0]}], "prompt": "a photo of a bicycle right of a tv"}
{"tag": "color_attr", "include": [{"class": "cup", "count": 1, "color": "red"}, {"class": "vase", "count": 1, "color": "white"}], "prompt": "a photo of a red cup and a white vase"}
"#;

    #[test]
    fn geneval_lines_parse_and_write_back_byte_for_byte() {
        let prompts = parse_metadata_jsonl(GENEVAL_LINES, Path::new("m.jsonl")).unwrap();
        assert_eq!(prompts.len(), 4);
        assert_eq!(prompts[1].exclude[0].count, 3);
        assert_eq!(prompts[2].include[1].position, Some((Relation::RightOf, 0)));
        let back: String = prompts.iter().map(|p| p.to_json_line() + "\n").collect();
        assert_eq!(back, GENEVAL_LINES);
    }

    #[test]
    fn bad_lines_are_located() {
        let text = "{\"tag\": \"colors\", \"include\": [], \"prompt\": \"x\"}\n";
        let err = parse_metadata_jsonl(text, Path::new("m.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.jsonl:1") && err.contains("no include"),
            "{err}"
        );
        let text = "\n{\"tag\": \"nope\", \"include\": [], \"prompt\": \"x\"}\n";
        let err = parse_metadata_jsonl(text, Path::new("m.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("m.jsonl:2") && err.contains("nope"), "{err}");
        let text = r#"{"tag": "position", "include": [{"class": "a", "count": 1, "position": ["above", 0]}], "prompt": "x"}"#;
        let err = parse_metadata_jsonl(text, Path::new("m.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not come before"), "{err}");
    }
}
