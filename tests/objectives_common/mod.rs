//! Shared by the objectives tests: a tiny MMDiT-like denoiser mirroring
//! tests/python/objectives_reference.py (joint attention over [soft tokens; text; image], soft
//! tokens prepended at each selected block and their outputs dropped after it), a flow-matching
//! noise process as SD3's (sigma = t / 1000), an in-memory dataset, and the Python fixture.
#![allow(dead_code)]

#[path = "../common/mod.rs"]
pub mod python;
use std::collections::BTreeMap;
use std::path::Path;

use softalign_core::adapter::Adapter;
use softalign_core::backbone::{Backbone, BackboneInfo, Conditioning, NoiseProcess, Prediction};
use softalign_core::dataset::{Batch, Dataset};
use softalign_core::plugin::{AdapterSpec, BuildContext};
use softalign_core::site::{Placement, SiteHook, SiteInfo, SiteKind};
use softalign_core::tensors::MappedSafetensors;
use softalign_core::Result;
use tch::{Device, Kind, Tensor};

pub const BLOCKS: i64 = 3;
pub const D: i64 = 16;
pub const DC: i64 = 12;

pub struct FlowMatch;

impl NoiseProcess for FlowMatch {
    fn add_noise(&self, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Tensor {
        let s = (t.to_kind(x0.kind()) / 1000.0).view([-1, 1, 1, 1]);
        x0 * (1.0 - &s) + eps * s
    }
    fn target(&self, x0: &Tensor, eps: &Tensor, _t: &Tensor) -> Tensor {
        eps - x0
    }
    fn predicted_x0(&self, x_t: &Tensor, pred: &Tensor, t: &Tensor) -> Tensor {
        x_t - (t.to_kind(x_t.kind()) / 1000.0).view([-1, 1, 1, 1]) * pred
    }
    fn sample_timesteps(&self, n: i64, device: Device) -> Tensor {
        Tensor::randint(1000, [n], (Kind::Int64, device)).to_kind(Kind::Float)
    }
}

pub struct Toy {
    info: BackboneInfo,
    w: BTreeMap<String, Tensor>,
    kind: Kind,
    vs: tch::nn::VarStore,
    noise: FlowMatch,
}

pub fn toy_info() -> BackboneInfo {
    BackboneInfo {
        kind: "toy_mmdit".into(),
        prediction: Prediction::Velocity,
        sites: (0..BLOCKS)
            .map(|k| SiteInfo {
                name: format!("joint_blocks.{k}"),
                kind: SiteKind::TextContext {
                    joint_dim: D,
                    context_dim: Some(DC),
                    placement: Placement::Prepend,
                },
            })
            .collect(),
        linear_sites: Vec::new(),
        conditioning: vec!["encoder_hidden_states".into(), "pooled_projections".into()],
    }
}

impl Toy {
    pub fn load(path: &Path, kind: Kind) -> Result<Self> {
        let file = MappedSafetensors::open(path)?;
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let mut w = BTreeMap::new();
        for (name, t) in file.all()? {
            let t = t.to_kind(kind);
            let _ = vs.root().var_copy(&name.replace('.', "_"), &t);
            w.insert(name, t);
        }
        let mut vs = vs;
        vs.freeze();
        Ok(Self {
            info: toy_info(),
            w,
            kind,
            vs,
            noise: FlowMatch,
        })
    }

    fn lin(&self, name: &str, x: &Tensor) -> Tensor {
        x.linear(
            &self.w[&format!("{name}.weight")],
            Some(&self.w[&format!("{name}.bias")]),
        )
    }
}

impl Backbone for Toy {
    fn info(&self) -> &BackboneInfo {
        &self.info
    }
    fn noise(&self) -> &dyn NoiseProcess {
        &self.noise
    }
    fn forward(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        cond: &Conditioning,
        hook: Option<&dyn SiteHook>,
    ) -> Result<Tensor> {
        let s = x_t.size();
        let (n, c, h_, w_) = (s[0], s[1], s[2], s[3]);
        let k = self.kind;
        let mut h = self.lin("proj_in", &x_t.to_kind(k).flatten(2, -1).transpose(1, 2));
        let temb = self
            .lin("time_embed", &(t.to_kind(k) / 1000.0).unsqueeze(1))
            .silu();
        let cvec = temb + self.lin("pooled_proj", &cond.get("pooled_projections")?.to_kind(k));
        let mut ctx = self.lin(
            "context_embedder",
            &cond.get("encoder_hidden_states")?.to_kind(k),
        );
        let l = ctx.size()[1];
        for b in 0..BLOCKS {
            let site = &self.info.sites[b as usize];
            let extra = match hook {
                Some(hk) => hk.context_tokens(site, t, n)?,
                None => None,
            };
            let ctx_in = match extra {
                Some(mut ct) => {
                    ct.tokens = ct.tokens.to_kind(k);
                    let tok = ct.into_joint(|x| self.lin("context_embedder", x));
                    Tensor::cat(&[tok, ctx.shallow_clone()], 1)
                }
                None => ctx.shallow_clone(),
            };
            let m = ctx_in.size()[1];
            let seq = Tensor::cat(&[ctx_in, &h + cvec.unsqueeze(1)], 1);
            let q = self.lin(&format!("joint_blocks.{b}.to_q"), &seq);
            let kk = self.lin(&format!("joint_blocks.{b}.to_k"), &seq);
            let v = self.lin(&format!("joint_blocks.{b}.to_v"), &seq);
            let a = (q.matmul(&kk.transpose(1, 2)) / (D as f64).sqrt())
                .softmax(-1, k)
                .matmul(&v);
            h = &h
                + self.lin(
                    &format!("joint_blocks.{b}.to_out"),
                    &a.narrow(1, m, a.size()[1] - m),
                );
            ctx = &ctx
                + self.lin(
                    &format!("joint_blocks.{b}.to_add_out"),
                    &a.narrow(1, m - l, l),
                );
        }
        let out = self.lin("proj_out", &h);
        Ok(out.transpose(1, 2).reshape([n, c, h_, w_]))
    }
    /// The reference's `toy_decode`: the first three channels through tanh, as RGB in [-1, 1].
    fn decode(&self, samples: &Tensor) -> Result<Tensor> {
        Ok(samples.narrow(1, 0, 3).tanh())
    }
    fn var_store(&self) -> &tch::nn::VarStore {
        &self.vs
    }
    fn var_store_mut(&mut self) -> &mut tch::nn::VarStore {
        &mut self.vs
    }
}

/// The soft-token adapter the Python reference uses (context space, blocks 0..2, 2 tokens,
/// 10 time buckets, positive/negative sets with EMA), with the fixture's values when given.
pub fn adapter(state: Option<&Path>) -> Box<dyn Adapter> {
    let spec: Box<dyn AdapterSpec> = toml::from_str(
        r#"
type = "soft_tokens"
tokens = 2
sites = "joint_blocks[0..2]"
time_buckets = 10
token_space = "context"
sets = ["positive", "negative"]
ema = true
ema_decay = 0.9
"#,
    )
    .expect("spec parses");
    let mut a = spec
        .build(&toy_info(), &BuildContext::cpu("."))
        .expect("adapter builds");
    if let Some(p) = state {
        a.load_state(&MappedSafetensors::open(p).unwrap().all().unwrap())
            .expect("fixture state loads");
    }
    a
}

/// Runs the Python reference into a fresh temp dir. Fails (never skips) without Python/torch.
pub fn python_fixture() -> tempfile::TempDir {
    python::python_fixture("objectives_reference.py")
}

/// The counting references (tests/python/counting_reference.py) in a fresh temp dir.
pub fn counting_fixture() -> tempfile::TempDir {
    python::python_fixture("counting_reference.py")
}

/// A batch file as `softalign loss` reads it.
pub fn read_batch(path: &Path) -> softalign_objectives::StepInputs {
    softalign_objectives::batch::read_batch(path, &toy_info(), Device::Cpu).expect("batch reads")
}

/// Samples held in memory.
pub struct MemDataset {
    pub x0: Tensor,
    pub ehs: Tensor,
    pub pooled: Tensor,
}

impl Dataset for MemDataset {
    fn len(&self) -> usize {
        self.x0.size()[0] as usize
    }
    fn batch(&self, indices: &[usize], device: Device) -> Result<Batch> {
        let idx = Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>());
        Ok(Batch::encoded(
            self.x0.index_select(0, &idx).to_device(device),
            Conditioning::new()
                .with("encoder_hidden_states", self.ehs.index_select(0, &idx))
                .with("pooled_projections", self.pooled.index_select(0, &idx)),
        ))
    }
}
