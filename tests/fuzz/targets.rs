//! The fuzz targets: each takes raw bytes and puts them through one reader of untrusted files,
//! as a user's file would go (written to disk where the reader takes a path). Errors are the
//! expected outcome; a panic, a hang or an outsized allocation fails the run.
use std::io::Cursor;
use std::path::PathBuf;

use softalign_backbones::clip::{ClipTextConfig, ClipTokenizer};
use softalign_backbones::sd3::Sd3Config;
use softalign_backbones::t5::{T5Config, T5Tokenizer};
use softalign_backbones::unet::UNetConfig;
use softalign_backbones::vae::VaeConfig;
use softalign_core::tensors::MappedSafetensors;
use softalign_core::torch_pickle::{read_zip, scan_pickle, STATE_DICT_GLOBALS};

/// A scratch folder per thread, with the recipe corpus's base beside the fuzzed files.
fn scratch() -> PathBuf {
    thread_local! {
        static DIR: tempfile::TempDir = {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(
                d.path().join("base.toml"),
                include_str!("../recipes/malformed/base.toml"),
            )
            .unwrap();
            d
        };
    }
    DIR.with(|d| d.path().to_path_buf())
}

fn put(name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

pub fn safetensors(b: &[u8]) {
    let p = put("f.safetensors", b);
    if let Ok(f) = MappedSafetensors::open(&p) {
        let _ = f.metadata();
        let _ = f.all();
    }
}

pub fn weight_index(b: &[u8]) {
    let dir = scratch().join("index");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("m.safetensors.index.json"), b).unwrap();
    let _ = softalign_backbones::weights::weight_files(&dir, "m");
}

pub fn pickle(b: &[u8]) {
    let _ = scan_pickle(b, Some(STATE_DICT_GLOBALS));
    let _ = scan_pickle(b, None);
}

pub fn torch_zip(b: &[u8]) {
    let _ = read_zip(Cursor::new(b), b.len() as u64, Some(STATE_DICT_GLOBALS));
}

pub fn recipe(b: &[u8]) {
    let p = put("r.toml", b);
    let _ = softalign_core::recipe::load(&p, &[]);
}

pub fn recipe_set(b: &[u8]) {
    let sets: Vec<String> = String::from_utf8_lossy(b)
        .lines()
        .map(str::to_string)
        .collect();
    let _ = softalign_core::recipe::load(&scratch().join("base.toml"), &sets);
}

pub fn tokenizer(b: &[u8]) {
    let p = put("tokenizer.json", b);
    if let Ok(t) = ClipTokenizer::from_file(&p, 8) {
        let _ = t.encode_batch(&["a b c abc", ""], tch::Device::Cpu);
    }
    if let Ok(t) = T5Tokenizer::from_file(&p, 8) {
        let _ = t.encode_batch(&["a b c abc", ""], tch::Device::Cpu);
    }
}

pub fn image(b: &[u8]) {
    let reader = image::ImageReader::new(Cursor::new(b));
    let _ = softalign_core::dataset::captioned::preprocess::decode_square(reader, 16);
}

pub fn config(b: &[u8]) {
    let p = put("config.json", b);
    let _ = UNetConfig::from_file(&p);
    let _ = VaeConfig::from_file(&p);
    let _ = Sd3Config::from_file(&p);
    let _ = ClipTextConfig::from_file(&p);
    let _ = T5Config::from_file(&p);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(b) {
        let _ =
            softalign_backbones::schedulers::ddim::DdimSpec::from_scheduler_config(Some(&v), 10);
    }
}
