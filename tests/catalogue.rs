//! The plugin catalogue (linkme) and the typetag registries must list the same names, and every
//! catalogue example must parse as the table it documents.
extern crate softalign_backbones;
extern crate softalign_objectives;

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;
use softalign_core::catalogue::{self, PluginKind};
use softalign_core::plugin::{
    AdapterSpec, BackboneSpec, DatasetSpec, DetectorSpec, ObjectiveSpec, RewardSpec, SamplerSpec,
};

/// typetag lists every registered name in its unknown-variant error.
fn typetag_names<T: ?Sized>() -> BTreeSet<String>
where
    Box<T>: DeserializeOwned,
{
    let err = match toml::from_str::<Box<T>>("type = \"__no_such_plugin__\"") {
        Ok(_) => panic!("a nonsense name deserialised"),
        Err(e) => e.message().to_string(),
    };
    if err.contains("there are no variants") {
        return BTreeSet::new();
    }
    let expected = err
        .split("expected")
        .nth(1)
        .unwrap_or_else(|| panic!("unexpected typetag error: {err}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

fn registry(kind: PluginKind) -> BTreeSet<String> {
    match kind {
        PluginKind::Backbone => typetag_names::<dyn BackboneSpec>(),
        PluginKind::Adapter => typetag_names::<dyn AdapterSpec>(),
        PluginKind::Objective => typetag_names::<dyn ObjectiveSpec>(),
        PluginKind::Sampler => typetag_names::<dyn SamplerSpec>(),
        PluginKind::Dataset => typetag_names::<dyn DatasetSpec>(),
        PluginKind::Detector => typetag_names::<dyn DetectorSpec>(),
        PluginKind::Reward => typetag_names::<dyn RewardSpec>(),
    }
}

#[test]
fn catalogue_names_are_unique() {
    let mut seen = BTreeSet::new();
    for e in catalogue::entries() {
        assert!(
            seen.insert((e.kind, e.name)),
            "duplicate catalogue entry {:?} `{}`",
            e.kind,
            e.name
        );
    }
}

#[test]
fn catalogue_and_typetag_agree() {
    for kind in PluginKind::ALL {
        let listed: BTreeSet<String> = catalogue::names(kind)
            .into_iter()
            .map(String::from)
            .collect();
        let registered = registry(kind);
        assert_eq!(
            listed, registered,
            "{kind:?}: catalogue (left) vs typetag registry (right)"
        );
    }
    // The foundation registers at least these; a dropped link would empty them.
    assert!(catalogue::find(PluginKind::Adapter, "soft_tokens").is_some());
    assert!(catalogue::find(PluginKind::Dataset, "tensor_file").is_some());
    assert!(catalogue::find(PluginKind::Detector, "yolov8").is_some());
    assert!(catalogue::find(PluginKind::Objective, "counting").is_some());
    assert!(catalogue::find(PluginKind::Objective, "diffusion_dpo").is_some());
    assert!(catalogue::find(PluginKind::Dataset, "preference_pairs").is_some());
    assert!(catalogue::find(PluginKind::Reward, "shapes_scorer").is_some());
}

fn parse_example<T: ?Sized>(kind: PluginKind, name: &str, example: &str)
where
    Box<T>: DeserializeOwned,
{
    let doc: toml::Table =
        toml::from_str(example).unwrap_or_else(|e| panic!("{name}: example is not TOML: {e}"));
    let table = doc
        .get(kind.table())
        .unwrap_or_else(|| panic!("{name}: example has no `{}` table", kind.table()));
    let table = match table {
        toml::Value::Array(a) => a
            .first()
            .cloned()
            .unwrap_or_else(|| panic!("{name}: empty array")),
        v => v.clone(),
    };
    assert_eq!(
        table.get("type").and_then(|t| t.as_str()),
        Some(name),
        "{name}: example names another type"
    );
    if let Err(e) = table.try_into::<Box<T>>() {
        panic!("{name}: example does not parse: {e}");
    }
}

#[test]
fn every_example_parses() {
    for e in catalogue::entries() {
        match e.kind {
            PluginKind::Backbone => parse_example::<dyn BackboneSpec>(e.kind, e.name, e.example),
            PluginKind::Adapter => parse_example::<dyn AdapterSpec>(e.kind, e.name, e.example),
            PluginKind::Objective => parse_example::<dyn ObjectiveSpec>(e.kind, e.name, e.example),
            PluginKind::Sampler => parse_example::<dyn SamplerSpec>(e.kind, e.name, e.example),
            PluginKind::Dataset => parse_example::<dyn DatasetSpec>(e.kind, e.name, e.example),
            PluginKind::Detector => parse_example::<dyn DetectorSpec>(e.kind, e.name, e.example),
            PluginKind::Reward => parse_example::<dyn RewardSpec>(e.kind, e.name, e.example),
        }
    }
}
