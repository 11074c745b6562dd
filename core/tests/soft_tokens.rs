//! The soft-token adapter on its own: placement of the time table, sets, EMA, files.
use std::collections::BTreeMap;

use softalign_core::adapter::{load_adapter, save_adapter, Adapter, TokenSelection};
use softalign_core::backbone::{BackboneInfo, Prediction};
use softalign_core::plugin::{AdapterSpec, BuildContext};
use softalign_core::site::{Placement, SiteInfo, SiteKind};
use tch::{Device, Kind, Tensor};

fn mmdit_like(blocks: usize) -> BackboneInfo {
    BackboneInfo {
        kind: "test".into(),
        prediction: Prediction::Velocity,
        sites: (0..blocks)
            .map(|i| SiteInfo {
                name: format!("joint_blocks.{i}"),
                kind: SiteKind::TextContext {
                    joint_dim: 6,
                    context_dim: Some(10),
                    placement: Placement::Prepend,
                },
            })
            .collect(),
        linear_sites: Vec::new(),
        conditioning: vec!["encoder_hidden_states".into()],
    }
}

fn spec(toml_text: &str) -> Box<dyn AdapterSpec> {
    toml::from_str(toml_text).unwrap()
}

fn ctx() -> BuildContext {
    BuildContext::cpu(".")
}

#[test]
fn time_table_rows_follow_the_reference_bucketing() {
    tch::manual_seed(0);
    let info = mmdit_like(4);
    let a = spec(
        "type = \"soft_tokens\"\ntokens = 2\nsites = \"joint_blocks[1..3]\"\ntime_buckets = 100",
    )
    .build(&info, &ctx())
    .unwrap();
    let tt = a
        .trainable()
        .into_iter()
        .find(|(n, _)| n == "time_table")
        .unwrap()
        .1;
    assert_eq!(tt.size(), [100, 2 * 6]);
    // t = 999.7 -> row 99; t = 1000 -> clamped to 99; t = 10 -> row 1; t = 9.99 -> row 0.
    let t = Tensor::from_slice(&[999.7f32, 1000.0, 10.0, 9.99]);
    let site = &info.sites[2];
    let ct = a
        .context_tokens(site, &t, 4, &TokenSelection::default())
        .unwrap()
        .unwrap();
    let off = ct.offset.unwrap();
    assert_eq!(off.size(), [4, 1, 6]);
    // Site joint_blocks.2 is the second selected site: chunk 1 of each row.
    let expect_rows = [99i64, 99, 1, 0];
    for (b, row) in expect_rows.iter().enumerate() {
        let want = tt.get(*row).narrow(0, 6, 6);
        assert!(
            off.get(b as i64).get(0).equal(&want),
            "batch {b} should use row {row}"
        );
    }
    // Unselected sites get nothing.
    assert!(a
        .context_tokens(&info.sites[0], &t, 4, &TokenSelection::default())
        .unwrap()
        .is_none());
}

#[test]
fn sets_ema_and_validation() {
    tch::manual_seed(1);
    let info = mmdit_like(3);
    let s = spec(
        "type = \"soft_tokens\"\ntokens = 3\nsites = \"joint_blocks.*\"\nsets = [\"positive\", \"negative\"]\nema = true\nema_decay = 0.5\ntoken_space = \"context\"",
    );
    assert_eq!(
        s.token_sets(),
        vec![
            ("positive".to_string(), true),
            ("negative".to_string(), true)
        ]
    );
    let a = s.build(&info, &ctx()).unwrap();
    let names: Vec<String> = a.state().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "negative.tokens",
            "positive.tokens",
            "ema.negative.tokens",
            "ema.positive.tokens"
        ]
    );
    let pos = a
        .trainable()
        .into_iter()
        .find(|(n, _)| n == "positive.tokens")
        .unwrap()
        .1;
    assert_eq!(pos.size(), [3, 3, 10]);
    assert!(pos.requires_grad());
    // EMA starts as a copy, then moves halfway towards the online tokens (decay 0.5).
    let ema_of = |a: &dyn Adapter| {
        a.state()
            .into_iter()
            .find(|(n, _)| n == "ema.positive.tokens")
            .unwrap()
            .1
    };
    assert!(ema_of(a.as_ref()).equal(&pos.detach()));
    let before = pos.detach().copy();
    {
        let _g = tch::no_grad_guard();
        let mut p = pos.shallow_clone();
        let _ = p.g_add_scalar_(2.0);
    }
    a.update_ema(0.5);
    let want = before + 1.0;
    assert!(ema_of(a.as_ref()).allclose(&want, 1e-6, 1e-6, false));
    let t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    let ema_tokens = a
        .context_tokens(&info.sites[0], &t, 2, &TokenSelection::ema("positive"))
        .unwrap()
        .unwrap();
    assert!(ema_tokens
        .tokens
        .get(0)
        .allclose(&want.get(0), 1e-6, 1e-6, false));
    assert!(a
        .context_tokens(&info.sites[0], &t, 2, &TokenSelection::online("other"))
        .is_err());

    for (bad, why) in [
        ("tokens = 0\nsites = \"joint_blocks.*\"", "tokens"),
        ("tokens = 2\nsites = \"joint_blocks[0..9]\"", "sites"),
        ("tokens = 2\nsites = \"joint_blocks[2..1]\"", "sites"),
        (
            "tokens = 2\nsites = \"joint_blocks.*\"\ntime_buckets = 2000",
            "time_buckets",
        ),
        ("tokens = 2\nsites = \"joint_blocks.*\"\nsets = []", "sets"),
        (
            "tokens = 2\nsites = \"joint_blocks.*\"\nema_decay = 1.5",
            "ema_decay",
        ),
    ] {
        let err = spec(&format!("type = \"soft_tokens\"\n{bad}"))
            .validate(&info)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(why),
            "`{bad}` gave `{err}`, which does not name `{why}`"
        );
    }
}

#[test]
fn adapter_files_round_trip_and_refuse_a_misfit() {
    tch::manual_seed(2);
    let info = mmdit_like(5);
    let a = spec(
        "type = \"soft_tokens\"\ntokens = 4\nsites = \"joint_blocks[0..5]\"\ntime_buckets = 10",
    )
    .build(&info, &ctx())
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter.safetensors");
    save_adapter(
        &path,
        a.as_ref(),
        &BTreeMap::from([("step".to_string(), "7".to_string())]),
    )
    .unwrap();
    let meta = softalign_core::tensors::MappedSafetensors::open(&path)
        .unwrap()
        .metadata()
        .unwrap();
    assert_eq!(meta["adapter"], "soft_tokens");
    assert_eq!(meta["step"], "7");
    assert_eq!(meta["tokens"], "4");
    assert_eq!(meta["time_buckets"], "10");
    let b = load_adapter(&path, &info, Device::Cpu).unwrap();
    for ((n1, t1), (n2, t2)) in a.state().into_iter().zip(b.state()) {
        assert_eq!(n1, n2);
        assert!(t1.equal(&t2), "{n1} differs after a round trip");
    }
    // A backbone with fewer blocks cannot host these tokens.
    let err = load_adapter(&path, &mmdit_like(3), Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("adapter.safetensors") && err.contains("sites"),
        "{err}"
    );
}

#[test]
fn shared_tokens_are_one_block_used_at_every_site_and_survive_a_file() {
    tch::manual_seed(4);
    let info = mmdit_like(3);
    let a = spec(
        "type = \"soft_tokens\"\ntokens = 2\nsites = \"joint_blocks[0..3]\"\nshared_tokens = true\n\
         time_buckets = 10\nshared_time_row = true",
    )
    .build(&info, &ctx())
    .unwrap();
    let params: BTreeMap<String, Tensor> = a.trainable().into_iter().collect();
    assert_eq!(params["default.tokens"].size(), [1, 2, 6]);
    assert_eq!(params["time_table"].size(), [10, 6]);
    let t = Tensor::from_slice(&[500.0f32]);
    let at = |k: usize| {
        let ct = a
            .context_tokens(&info.sites[k], &t, 1, &TokenSelection::default())
            .unwrap()
            .unwrap();
        (ct.tokens, ct.offset.unwrap())
    };
    let (t0, o0) = at(0);
    let (t2, o2) = at(2);
    assert!(t0.equal(&t2) && o0.equal(&o2));
    // A gradient through two sites reaches the one block twice.
    (t0.sum(Kind::Float) + t2.sum(Kind::Float)).backward();
    let g = params["default.tokens"].grad();
    assert!(g.equal(&Tensor::full([1, 2, 6], 2.0, (Kind::Float, Device::Cpu))));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.safetensors");
    save_adapter(&path, a.as_ref(), &BTreeMap::new()).unwrap();
    let b = load_adapter(&path, &info, Device::Cpu).unwrap();
    let (u0, _) = {
        let ct = b
            .context_tokens(&info.sites[1], &t, 1, &TokenSelection::default())
            .unwrap()
            .unwrap();
        (ct.tokens, ())
    };
    assert!(u0.equal(&t0));
}
