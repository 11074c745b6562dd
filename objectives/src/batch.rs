//! Batch files for `softalign loss`: a safetensors file holding one fixed step.
//!
//! `x0` (B, C, H, W); `noise` (C, H, W) shared or (B, C, H, W) per image; `timestep` the
//! 0..999 integer shared by the step, shape () or (1,); and the caption conditioning named as
//! the backbone's forward arguments, batch first (caption i belongs to image i).
use std::path::Path;

use softalign_core::backbone::{BackboneInfo, Conditioning};
use softalign_core::tensors::MappedSafetensors;
use softalign_core::{Error, Result};
use tch::{Device, Kind};

use crate::step::StepInputs;

pub fn read_batch(path: &Path, backbone: &BackboneInfo, device: Device) -> Result<StepInputs> {
    let file = MappedSafetensors::open(path)?;
    let mut all = file.all()?;
    let mut take = |name: &str| {
        all.remove(name)
            .ok_or_else(|| Error::file(path, format!("tensor `{name}` missing")))
    };
    let x0 = take("x0")?;
    let noise = take("noise")?;
    let timestep = take("timestep")?;
    let mut cond = Conditioning::new();
    for name in &backbone.conditioning {
        cond = cond.with(name, take(name)?.to_device(device));
    }
    if !all.is_empty() {
        let names: Vec<&str> = all.keys().map(String::as_str).collect();
        return Err(Error::file(
            path,
            format!(
                "unexpected tensors {} (the backbone `{}` takes x0, noise, timestep, {})",
                names.join(", "),
                backbone.kind,
                backbone.conditioning.join(", ")
            ),
        ));
    }
    if x0.dim() != 4 {
        return Err(Error::file(
            path,
            format!("tensor `x0`: shape {:?}, expected (B, C, H, W)", x0.size()),
        ));
    }
    if timestep.numel() != 1 || timestep.dim() > 1 {
        return Err(Error::file(
            path,
            format!(
                "tensor `timestep`: shape {:?}, expected () or (1,): one timestep per step",
                timestep.size()
            ),
        ));
    }
    let t = timestep.to_kind(Kind::Double).double_value(&[]);
    if !(t.fract() == 0.0 && (0.0..=999.0).contains(&t)) {
        return Err(Error::file(
            path,
            format!("tensor `timestep`: {t} is not an integer in 0..=999"),
        ));
    }
    Ok(StepInputs {
        x0: x0.to_kind(Kind::Float).to_device(device),
        cond,
        noise: noise.to_kind(Kind::Float).to_device(device),
        timestep: timestep.to_kind(Kind::Float).reshape([1]).to_device(device),
        captions: None,
        preference_pairs: false,
    })
}
