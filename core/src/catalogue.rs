//! The plugin catalogue: every plugin registers a one-line summary and an example TOML
//! snippet here (linkme), so `softalign list` can show what a recipe may name, and an unknown
//! name can be answered with the known ones and the nearest match.
use linkme::distributed_slice;

/// The kinds of plugin a recipe names with `type = "..."`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PluginKind {
    Backbone,
    Adapter,
    Objective,
    Sampler,
    Dataset,
    Detector,
    Reward,
}

impl PluginKind {
    pub const ALL: [PluginKind; 7] = [
        PluginKind::Backbone,
        PluginKind::Adapter,
        PluginKind::Objective,
        PluginKind::Sampler,
        PluginKind::Dataset,
        PluginKind::Detector,
        PluginKind::Reward,
    ];
    /// The recipe table that holds this kind (`[backbone]`, `[[adapter]]`, ...).
    pub fn table(self) -> &'static str {
        match self {
            PluginKind::Backbone => "backbone",
            PluginKind::Adapter => "adapter",
            PluginKind::Objective => "objective",
            PluginKind::Sampler => "sampler",
            PluginKind::Dataset => "data",
            // Nested in the objectives that use one: `detector = { type = "yolov8", ... }`.
            PluginKind::Detector => "detector",
            PluginKind::Reward => "reward",
        }
    }
}

#[derive(Debug)]
pub struct PluginEntry {
    pub kind: PluginKind,
    /// The name recipes use (`type = "..."`), identical to the typetag name.
    pub name: &'static str,
    pub summary: &'static str,
    /// A TOML snippet that parses as that table of a recipe.
    pub example: &'static str,
}

#[distributed_slice]
pub static PLUGINS: [PluginEntry];

/// Registers a catalogue entry next to a plugin's typetag impl.
#[macro_export]
macro_rules! register_plugin {
    ($ident:ident, $kind:ident, $name:literal, $summary:literal, $example:expr) => {
        #[$crate::linkme::distributed_slice($crate::catalogue::PLUGINS)]
        #[linkme(crate = $crate::linkme)]
        static $ident: $crate::catalogue::PluginEntry = $crate::catalogue::PluginEntry {
            kind: $crate::catalogue::PluginKind::$kind,
            name: $name,
            summary: $summary,
            example: $example,
        };
    };
}

/// All entries, sorted by kind then name (linkme's order is unspecified).
pub fn entries() -> Vec<&'static PluginEntry> {
    let mut v: Vec<&PluginEntry> = PLUGINS.iter().collect();
    v.sort_by_key(|e| (e.kind, e.name));
    v
}

pub fn names(kind: PluginKind) -> Vec<&'static str> {
    entries()
        .into_iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.name)
        .collect()
}

pub fn find(kind: PluginKind, name: &str) -> Option<&'static PluginEntry> {
    PLUGINS.iter().find(|e| e.kind == kind && e.name == name)
}

/// The known name closest to `name` (Jaro-Winkler), if any is reasonably close.
pub fn nearest(kind: PluginKind, name: &str) -> Option<&'static str> {
    names(kind)
        .into_iter()
        .map(|n| (strsim::jaro_winkler(n, name), n))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, n)| n)
}

/// "unknown objective `x`; known: a, b, c; did you mean `b`?"
pub fn unknown_message(kind: PluginKind, name: &str) -> String {
    let known = names(kind);
    let mut msg = format!(
        "unknown {} `{name}`; known: {}",
        kind.table(),
        if known.is_empty() {
            "(none registered)".to_string()
        } else {
            known.join(", ")
        }
    );
    if let Some(n) = nearest(kind, name) {
        msg.push_str(&format!("; did you mean `{n}`?"));
    }
    msg
}
