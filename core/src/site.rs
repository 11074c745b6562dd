//! Injection sites: the named places where a backbone lets adapters act. A backbone knows
//! "this is a text-context site", never "soft tokens"; an adapter never knows which backbone
//! it is in. They meet here.
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::{Error, Result};

/// Where a site puts extra context tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// In front of the text tokens (MMDiT joint blocks); the backbone drops their outputs after
    /// the block.
    Prepend,
    /// After the first (BOS) token (UNet cross-attention).
    AfterBos,
}

/// The space soft tokens live in at a text-context site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TokenSpace {
    /// The width the block sees (SD3: caption_projection_dim, after the context_embedder).
    #[default]
    Joint,
    /// The text encoder's width; the backbone passes the tokens through its own frozen input
    /// projection (SD3: context_embedder, joint_attention_dim wide).
    Context,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SiteKind {
    TextContext {
        /// Token width the block sees.
        joint_dim: i64,
        /// Token width before the backbone's input projection, where it has one.
        context_dim: Option<i64>,
        placement: Placement,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteInfo {
    pub name: String,
    pub kind: SiteKind,
}

impl SiteInfo {
    /// Token width for `space` at this site, or an error naming the site.
    pub fn token_dim(&self, space: TokenSpace) -> Result<i64> {
        let SiteKind::TextContext {
            joint_dim,
            context_dim,
            ..
        } = &self.kind;
        match space {
            TokenSpace::Joint => Ok(*joint_dim),
            TokenSpace::Context => context_dim.ok_or_else(|| {
                Error::invalid(format!(
                    "site `{}` has no context-space input projection; use token_space = \"joint\"",
                    self.name
                ))
            }),
        }
    }
}

/// Tokens an adapter hands to a text-context site: (B, n, d) in `space`, plus an optional
/// (B, 1, joint_dim) offset the site adds to every token once they are in the joint space (the
/// SoftREPA time table lives there even when the tokens live in the context space).
pub struct ContextTokens {
    pub tokens: Tensor,
    pub space: TokenSpace,
    pub offset: Option<Tensor>,
}

impl ContextTokens {
    /// The tokens in the joint space: `project` is the site's frozen input projection, used
    /// only for context-space tokens.
    pub fn into_joint(self, project: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
        let t = match self.space {
            TokenSpace::Joint => self.tokens,
            TokenSpace::Context => project(&self.tokens),
        };
        match self.offset {
            Some(o) => {
                let k = t.kind();
                t + o.to_kind(k)
            }
            None => t,
        }
    }
}

/// What a backbone calls at each site during a forward. `t` is the per-sample model timestep
/// (B,) on the 0..1000 scale the backbone's noise process uses.
pub trait SiteHook {
    fn context_tokens(
        &self,
        site: &SiteInfo,
        t: &Tensor,
        batch: i64,
    ) -> Result<Option<ContextTokens>>;
    /// What the Linear layer named `site` (a [`crate::linear_site::LinearSite`] name) adds to
    /// its output for input `x` (LoRA); None: nothing. `base` is the frozen layer and its
    /// output for `x`.
    fn linear_delta(
        &self,
        site: &str,
        x: &Tensor,
        base: &crate::linear_site::LinearBase<'_>,
    ) -> Result<Option<Tensor>> {
        let _ = (site, x, base);
        Ok(None)
    }
    /// Whether `linear_delta` can return anything (lets a forward skip the Linear scope).
    fn has_linear_deltas(&self) -> bool {
        false
    }
}

/// A site selection as written in recipes: `"joint_blocks[0..5]"`, `"joint_blocks[0..=4]"`,
/// `"down"`, `"joint_blocks.*"`, or a list of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SiteSelector {
    One(String),
    Many(Vec<String>),
}

/// As a user wrote it: `joint_blocks[0..5]`, or the list joined by ", ".
impl std::fmt::Display for SiteSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SiteSelector::One(s) => f.write_str(s),
            SiteSelector::Many(v) => f.write_str(&v.join(", ")),
        }
    }
}

impl SiteSelector {
    fn patterns(&self) -> Vec<&str> {
        match self {
            SiteSelector::One(s) => vec![s.as_str()],
            SiteSelector::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }

    /// Checks the syntax without knowing the backbone.
    pub fn check_syntax(&self) -> Result<()> {
        let pats = self.patterns();
        if pats.is_empty() {
            return Err(Error::invalid("`sites` selects nothing (empty list)"));
        }
        for p in pats {
            parse_pattern(p)?;
        }
        Ok(())
    }

    /// The selected sites of `available`, in the backbone's order. Every pattern must match
    /// at least one site, so a typo or an index past the last block is an error.
    pub fn resolve(&self, available: &[SiteInfo]) -> Result<Vec<SiteInfo>> {
        let mut chosen = vec![false; available.len()];
        for p in self.patterns() {
            let pat = parse_pattern(p)?;
            let mut hit = false;
            for (k, s) in available.iter().enumerate() {
                if pat.matches(&s.name) {
                    chosen[k] = true;
                    hit = true;
                }
            }
            if !hit || !pat.all_indices_exist(available) {
                let names: Vec<&str> = available.iter().map(|s| s.name.as_str()).collect();
                return Err(Error::invalid(format!(
                    "sites: `{p}` does not match the backbone's sites ({})",
                    summarise_names(&names)
                )));
            }
        }
        Ok(available
            .iter()
            .zip(chosen)
            .filter(|(_, c)| *c)
            .map(|(s, _)| s.clone())
            .collect())
    }
}

impl SiteSelector {
    /// Which of `paths` (module paths such as `transformer_blocks.3.attn.to_q`) lie under
    /// the selected modules: `transformer_blocks[0..5]` picks the paths under blocks 0 to 4,
    /// `transformer_blocks.*` or `transformer_blocks` all of them. Every pattern must pick
    /// something and every index of a range must exist, as for sites.
    pub fn select_under(&self, paths: &[&str]) -> Result<Vec<bool>> {
        let mut chosen = vec![false; paths.len()];
        for p in self.patterns() {
            let pat = parse_pattern(p)?;
            let mut hit = false;
            for (k, path) in paths.iter().enumerate() {
                if pat.matches_under(path) {
                    chosen[k] = true;
                    hit = true;
                }
            }
            let all_exist = match &pat {
                Pattern::Range { base, lo, hi } => (*lo..*hi).all(|i| {
                    let b = format!("{base}.{i}.");
                    paths.iter().any(|p| p.starts_with(&b))
                }),
                _ => true,
            };
            if !hit || !all_exist {
                return Err(Error::invalid(format!(
                    "blocks: `{p}` does not match the model's modules (e.g. {})",
                    summarise_names(&paths[..paths.len().min(3)])
                )));
            }
        }
        Ok(chosen)
    }
}

fn summarise_names(names: &[&str]) -> String {
    if names.len() <= 8 {
        names.join(", ")
    } else {
        format!(
            "{}, ..., {} ({} sites)",
            names[..3].join(", "),
            names[names.len() - 1],
            names.len()
        )
    }
}

enum Pattern {
    Exact(String),
    Prefix(String),
    Range { base: String, lo: usize, hi: usize },
}

impl Pattern {
    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(n) => n == name,
            Pattern::Prefix(p) => name
                .strip_prefix(p.as_str())
                .is_some_and(|r| r.starts_with('.')),
            Pattern::Range { base, lo, hi } => name
                .strip_prefix(base.as_str())
                .and_then(|r| r.strip_prefix('.'))
                .and_then(|r| r.parse::<usize>().ok())
                .is_some_and(|i| (*lo..*hi).contains(&i)),
        }
    }
    /// Whether `path` is the module this pattern names or lies inside it.
    fn matches_under(&self, path: &str) -> bool {
        let under = |base: &str| {
            path == base || path.strip_prefix(base).is_some_and(|r| r.starts_with('.'))
        };
        match self {
            Pattern::Exact(n) | Pattern::Prefix(n) => under(n),
            Pattern::Range { base, lo, hi } => path
                .strip_prefix(base.as_str())
                .and_then(|r| r.strip_prefix('.'))
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| (*lo..*hi).contains(&i)),
        }
    }
    fn all_indices_exist(&self, available: &[SiteInfo]) -> bool {
        match self {
            Pattern::Range { base, lo, hi } => {
                (*lo..*hi).all(|i| available.iter().any(|s| s.name == format!("{base}.{i}")))
            }
            _ => true,
        }
    }
}

fn parse_pattern(p: &str) -> Result<Pattern> {
    let p = p.trim();
    let bad = |why: &str| Error::invalid(format!("sites: cannot read `{p}`: {why}"));
    if p.is_empty() {
        return Err(bad("empty name"));
    }
    if let Some(base) = p.strip_suffix(".*") {
        return Ok(Pattern::Prefix(base.to_string()));
    }
    let Some(open) = p.find('[') else {
        return Ok(Pattern::Exact(p.to_string()));
    };
    let inner = p[open + 1..]
        .strip_suffix(']')
        .ok_or_else(|| bad("missing `]`"))?;
    let base = p[..open].to_string();
    let (lo, hi, inclusive) = if let Some((a, b)) = inner.split_once("..=") {
        (a, b, true)
    } else if let Some((a, b)) = inner.split_once("..") {
        (a, b, false)
    } else {
        (inner, inner, true)
    };
    let lo: usize = lo
        .trim()
        .parse()
        .map_err(|_| bad("range bounds must be non-negative integers"))?;
    let hi: usize = hi
        .trim()
        .parse()
        .map_err(|_| bad("range bounds must be non-negative integers"))?;
    let hi = if inclusive { hi + 1 } else { hi };
    if hi <= lo {
        return Err(bad("empty range"));
    }
    Ok(Pattern::Range { base, lo, hi })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sites(n: usize) -> Vec<SiteInfo> {
        (0..n)
            .map(|i| SiteInfo {
                name: format!("joint_blocks.{i}"),
                kind: SiteKind::TextContext {
                    joint_dim: 8,
                    context_dim: Some(16),
                    placement: Placement::Prepend,
                },
            })
            .collect()
    }

    #[test]
    fn ranges_select_the_right_blocks() {
        let s = sites(6);
        let sel = SiteSelector::One("joint_blocks[0..5]".into())
            .resolve(&s)
            .unwrap();
        assert_eq!(sel.len(), 5);
        let sel = SiteSelector::One("joint_blocks[1..=2]".into())
            .resolve(&s)
            .unwrap();
        assert_eq!(
            sel.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["joint_blocks.1", "joint_blocks.2"]
        );
        assert_eq!(
            SiteSelector::One("joint_blocks.*".into())
                .resolve(&s)
                .unwrap()
                .len(),
            6
        );
    }

    #[test]
    fn impossible_selections_fail() {
        let s = sites(4);
        assert!(SiteSelector::One("joint_blocks[0..5]".into())
            .resolve(&s)
            .is_err());
        assert!(SiteSelector::One("joint_blocks[3..1]".into())
            .check_syntax()
            .is_err());
        assert!(SiteSelector::One("down".into()).resolve(&s).is_err());
        assert!(SiteSelector::Many(vec![]).check_syntax().is_err());
    }
}
