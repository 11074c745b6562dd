//! Training data for the shapes world's detector (assets/shapes-detector, trained by
//! scripts/train_shapes_detector.py): `n` scenes of the world's full distribution (held-out
//! combinations included: a detector should know every shape in every colour), rendered at
//! 32 px, with their exact boxes.
//!
//! usage: cargo run --release --example shapes_detector_data -- OUT.safetensors N SEED
//!
//! Writes `images` (N, 3, 32, 32) uint8 RGB, `boxes` (N, 10, 5) f32 rows of (class, cx, cy, w,
//! h) in pixels padded with class -1, and the class names (Shape::ALL order) as metadata.
use std::collections::BTreeMap;

use softalign_core::tensors::save_safetensors;
use softalign_worlds::shapes::{train_example, SceneConfig, Shape};
use tch::{Kind, Tensor};

const MAX_OBJECTS: usize = 10;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, out, n, seed] = &args[..] else {
        anyhow::bail!("usage: shapes_detector_data OUT.safetensors N SEED");
    };
    let n: u64 = n.parse()?;
    let seed: u64 = seed.parse()?;
    let cfg = SceneConfig::default();
    let side = cfg.image_size as i64;
    let mut pixels: Vec<u8> = Vec::new();
    let mut boxes = vec![-1f32; n as usize * MAX_OBJECTS * 5];
    for i in 0..n {
        let ex = train_example(i, seed, &cfg)?;
        // HWC to CHW.
        let raw = ex.image.as_raw();
        for c in 0..3 {
            pixels.extend(raw.iter().skip(c).step_by(3));
        }
        for (k, o) in ex.scene.objects.iter().enumerate() {
            let class = Shape::ALL
                .iter()
                .position(|s| *s == o.shape)
                .expect("a world shape");
            let row = (i as usize * MAX_OBJECTS + k) * 5;
            boxes[row..row + 5].copy_from_slice(&[class as f32, o.cx, o.cy, o.size, o.size]);
        }
    }
    let images = Tensor::from_slice(&pixels).view([n as i64, 3, side, side]);
    let boxes = Tensor::from_slice(&boxes).view([n as i64, MAX_OBJECTS as i64, 5]);
    let names: Vec<&str> = Shape::ALL.iter().map(|s| s.name()).collect();
    let meta = BTreeMap::from([
        ("names".to_string(), names.join(",")),
        ("seed".to_string(), seed.to_string()),
    ]);
    save_safetensors(
        out,
        &[
            ("images".to_string(), images.to_kind(Kind::Uint8)),
            ("boxes".to_string(), boxes),
        ],
        &meta,
    )?;
    println!("{out}: {n} scenes (seed {seed})");
    Ok(())
}
