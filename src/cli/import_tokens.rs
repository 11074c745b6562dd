//! `softalign import-tokens`: the SoftREPA release's `dc_tokens.pth` (a pickled Parameter) and
//! `dc_t_tokens.pth` (a pickled nn.Embedding, the time table) to this project's soft-token
//! adapter file, laid out for the backbone's sites.
//!
//! Layouts (shared/reference/softrepa-official.md):
//! - sd3: tokens (layers, n, d) for joint blocks 0..layers. d = the joint width (released: 1536,
//!   used as they are) or 4096 (the current reference code's T5-space tokens, which go through
//!   the frozen `context_embedder`). Time table (100, layers * joint width), chunk k for block k.
//! - sd15: tokens (n, 768) at the UNet's `down` group; time table (100, 768), one row shared by
//!   all tokens and groups.
//! - sdxl: tokens (n, 2048) at `down` and `mid`; the reference uses ONE token tensor for both
//!   groups, which this format stores once per site (two identical copies: they sample the same,
//!   and would diverge only if trained further here).
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use softalign_core::adapter::save_adapter;
use softalign_core::adapter::soft_tokens::{SoftTokensSpec, TokenInit};
use softalign_core::backbone::{BackboneInfo, Prediction};
use softalign_core::plugin::{AdapterSpec, BuildContext};
use softalign_core::site::{Placement, SiteInfo, SiteKind, SiteSelector, TokenSpace};
use tch::{Device, Kind, Tensor};

use super::torch_pickle::read_single;

#[derive(clap::Args)]
pub struct Args {
    /// Folder holding dc_tokens.pth and (optionally) dc_t_tokens.pth.
    pub dir: PathBuf,
    /// sd3, sd15 or sdxl.
    #[arg(long)]
    pub backbone: String,
    /// The adapter file to write (.safetensors).
    #[arg(long)]
    pub output: PathBuf,
    /// SD3 only: the transformer's joint width (caption_projection_dim), used when there is no
    /// time table to read it from (SD3-medium: 1536).
    #[arg(long, default_value_t = 1536)]
    pub joint_dim: i64,
}

/// SD3's `joint_attention_dim`: tokens of this width live in the context space.
const SD3_CONTEXT_DIM: i64 = 4096;

struct Plan {
    info: BackboneInfo,
    spec: SoftTokensSpec,
    tokens: Tensor,
    time_table: Option<Tensor>,
}

fn site(name: String, joint: i64, context: Option<i64>, placement: Placement) -> SiteInfo {
    SiteInfo {
        name,
        kind: SiteKind::TextContext {
            joint_dim: joint,
            context_dim: context,
            placement,
        },
    }
}

fn spec(
    tokens: i64,
    sites: Vec<String>,
    buckets: i64,
    shared: bool,
    space: TokenSpace,
) -> SoftTokensSpec {
    SoftTokensSpec {
        tokens,
        sites: SiteSelector::Many(sites),
        time_buckets: buckets,
        shared_time_row: shared,
        shared_tokens: shared,
        token_space: space,
        init: TokenInit::Zeros,
        time_init_std: 0.0,
        sets: vec!["default".into()],
        ema: false,
        ema_decay: 0.9999,
        ema_init: Default::default(),
    }
}

fn plan_sd3(tokens: Tensor, table: Option<Tensor>, joint_flag: i64) -> anyhow::Result<Plan> {
    let s = tokens.size();
    let [layers, n, d] = s[..] else {
        bail!("dc_tokens: SD3 tokens are (layers, tokens, dim), got {s:?}");
    };
    let joint = match &table {
        Some(t) => {
            let w = t.size()[1];
            if w % layers != 0 {
                bail!("dc_t_tokens: width {w} is not a multiple of the {layers} token layers");
            }
            w / layers
        }
        None => joint_flag,
    };
    let space = if d == joint {
        TokenSpace::Joint
    } else if d == SD3_CONTEXT_DIM {
        TokenSpace::Context
    } else {
        bail!(
            "dc_tokens: token width {d} is neither the joint width {joint} nor SD3's \
             joint_attention_dim {SD3_CONTEXT_DIM}"
        );
    };
    let names: Vec<String> = (0..layers).map(|i| format!("joint_blocks.{i}")).collect();
    let sites = names
        .iter()
        .map(|n| site(n.clone(), joint, Some(SD3_CONTEXT_DIM), Placement::Prepend))
        .collect();
    let buckets = table.as_ref().map_or(0, |t| t.size()[0]);
    Ok(Plan {
        info: BackboneInfo {
            kind: "sd3".into(),
            prediction: Prediction::Velocity,
            sites,
            linear_sites: Vec::new(),
            conditioning: Vec::new(),
        },
        spec: spec(n, names, buckets, false, space),
        tokens,
        time_table: table,
    })
}

fn plan_unet(
    tokens: Tensor,
    table: Option<Tensor>,
    groups: &[&str],
    dim: i64,
) -> anyhow::Result<Plan> {
    let tokens = match tokens.size()[..] {
        [_, d] if d == dim => tokens,
        [1, _, d] if d == dim => tokens.squeeze_dim(0),
        ref s => bail!("dc_tokens: expected (tokens, {dim}), got {s:?}"),
    };
    if let Some(t) = &table {
        if t.size()[1] != dim {
            bail!("dc_t_tokens: expected (buckets, {dim}), got {:?}", t.size());
        }
    }
    let n = tokens.size()[0];
    let names: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    let sites = names
        .iter()
        .map(|g| site(g.clone(), dim, None, Placement::AfterBos))
        .collect();
    // The reference uses one token block in every active group: stored once, shared.
    let stacked = tokens.unsqueeze(0);
    let buckets = table.as_ref().map_or(0, |t| t.size()[0]);
    Ok(Plan {
        info: BackboneInfo {
            kind: "unet".into(),
            prediction: Prediction::Epsilon,
            sites,
            linear_sites: Vec::new(),
            conditioning: Vec::new(),
        },
        spec: spec(n, names, buckets, true, TokenSpace::Joint),
        tokens: stacked,
        time_table: table,
    })
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let tokens_path = a.dir.join("dc_tokens.pth");
    let tokens = read_single(&tokens_path)?.tensor.to_kind(Kind::Float);
    let table_path = a.dir.join("dc_t_tokens.pth");
    let table = if table_path.is_file() {
        let f = read_single(&table_path)?;
        if f.tensor.dim() != 2 {
            bail!(
                "{}: the time table must be 2-D, got {:?}",
                table_path.display(),
                f.tensor.size()
            );
        }
        Some(f.tensor.to_kind(Kind::Float))
    } else {
        None
    };
    let plan = match a.backbone.as_str() {
        "sd3" => plan_sd3(tokens, table, a.joint_dim)?,
        "sd15" => plan_unet(tokens, table, &["down"], 768)?,
        "sdxl" => plan_unet(tokens, table, &["down", "mid"], 2048)?,
        other => bail!("--backbone `{other}`: expected sd3, sd15 or sdxl"),
    };
    let ctx = BuildContext {
        device: Device::Cpu,
        recipe_dir: PathBuf::from("."),
        dtype_override: None,
        empty_prompt: Default::default(),
    };
    let mut adapter = plan
        .spec
        .build(&plan.info, &ctx)
        .context("laying out the soft tokens")?;
    let mut state = BTreeMap::from([("default.tokens".to_string(), plan.tokens)]);
    if let Some(t) = plan.time_table {
        state.insert("time_table".into(), t);
    }
    adapter
        .load_state(&state)
        .context("filling the adapter with the released tensors")?;
    let extra = BTreeMap::from([
        ("imported_from".to_string(), a.dir.display().to_string()),
        ("imported_backbone".to_string(), a.backbone.clone()),
    ]);
    save_adapter(&a.output, adapter.as_ref(), &extra)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "wrote {} ({} backbone, sites {}, {} tokens{})",
        a.output.display(),
        a.backbone,
        plan.spec.sites,
        plan.spec.tokens,
        if plan.spec.time_buckets > 0 {
            format!(", time table of {} rows", plan.spec.time_buckets)
        } else {
            String::new()
        }
    );
    Ok(())
}
