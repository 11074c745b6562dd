//! Valid files the fuzzer and the hostile corpus start from, built here rather than
//! committed as binaries.
use std::io::Write;

use softalign_core::tensors::save_safetensors;
use tch::Tensor;

/// A safetensors file of a few tensors, with metadata.
pub fn safetensors() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.safetensors");
    let t = vec![
        (
            "a.weight".to_string(),
            Tensor::from_slice(&[1f32, 2., 3., 4., 5., 6.]).view([2, 3]),
        ),
        ("b".to_string(), Tensor::from_slice(&[7i64, 8])),
        ("c".to_string(), Tensor::from_slice(&[1u8, 0, 1, 1])),
    ];
    let meta = [("format".to_string(), "pt".to_string())].into();
    save_safetensors(&p, &t, &meta).unwrap();
    std::fs::read(p).unwrap()
}

/// A safetensors file from a header written by hand (the data is `data_len` zero bytes).
pub fn safetensors_raw(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.resize(out.len() + data_len, 0);
    out
}

/// The pickle `torch.save({"w": torch.zeros(2, 3)})` writes (protocol 2, memo puts left
/// out), with `global` as the rebuild function's module and name.
pub fn pickle_with(rebuild: &str, shape: (u8, u8), stride: (u8, u8), offset: u8) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(b"\x80\x02}(X\x01\x00\x00\x00w");
    p.extend_from_slice(format!("c{rebuild}\n").as_bytes());
    p.extend_from_slice(b"((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
    p.extend_from_slice(&[
        b'K', offset, b'K', shape.0, b'K', shape.1, 0x86, b'K', stride.0, b'K', stride.1, 0x86,
    ]);
    p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtRu.");
    p
}

pub fn pickle() -> Vec<u8> {
    pickle_with("torch._utils\n_rebuild_tensor_v2", (2, 3), (3, 1), 0)
}

/// A torch.save zip: `archive/data.pkl` and the storages (name, bytes), stored uncompressed as
/// torch writes them, plus any `extra` members.
pub fn torch_zip(pkl: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut zw = zip::ZipWriter::new(&mut buf);
        let opts =
            zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zw.start_file("archive/data.pkl", opts).unwrap();
        zw.write_all(pkl).unwrap();
        for (name, bytes) in storages {
            zw.start_file(*name, opts).unwrap();
            zw.write_all(bytes).unwrap();
        }
        zw.finish().unwrap();
    }
    buf.into_inner()
}

/// The state dict of [`pickle`] as a .bin file (six floats).
pub fn torch_bin() -> Vec<u8> {
    torch_zip(&pickle(), &[("archive/data/0", vec![0u8; 24])])
}

/// A CLIP-style tokenizer.json: a tiny byte-level BPE with BOS / EOS.
pub fn tokenizer_json() -> Vec<u8> {
    let mut vocab = serde_json::Map::new();
    for (i, t) in [
        "<|startoftext|>",
        "<|endoftext|>",
        "a",
        "b",
        "c",
        "ab</w>",
        "a</w>",
        "b</w>",
        "c</w>",
    ]
    .iter()
    .enumerate()
    {
        vocab.insert(t.to_string(), i.into());
    }
    serde_json::to_vec(&serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<|startoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true},
            {"id": 1, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true}
        ],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", 1], "cls": ["<|startoftext|>", 0], "trim_offsets": false, "add_prefix_space": false},
        "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": ["a b</w>"]}
    }))
    .unwrap()
}

/// A 4 x 3 PNG and a 5 x 2 JPEG.
pub fn images() -> Vec<Vec<u8>> {
    let img = image::RgbImage::from_fn(4, 3, |x, y| image::Rgb([x as u8 * 60, y as u8 * 80, 7]));
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let img = image::RgbImage::from_fn(5, 2, |x, y| image::Rgb([x as u8 * 50, y as u8 * 99, 200]));
    let mut jpg = std::io::Cursor::new(Vec::new());
    img.write_to(&mut jpg, image::ImageFormat::Jpeg).unwrap();
    vec![png.into_inner(), jpg.into_inner()]
}

/// Recipes: the malformed corpus's base, one extending it, and a few more shapes of TOML.
pub fn recipes() -> Vec<Vec<u8>> {
    let base = include_str!("../recipes/malformed/base.toml");
    vec![
        base.as_bytes().to_vec(),
        b"extends = \"base.toml\"\n[train]\nlr = 5e-4\nsteps = 3\n".to_vec(),
        b"extends = [\"base.toml\"]\nseed = 3\n[[adapter]]\ntype = \"lora\"\nrank = 4\n".to_vec(),
        b"extends = \"base.toml\"\n[backbone]\ntype = \"unet\"\npreset = \"tiny\"\n".to_vec(),
    ]
}

/// `--set` overrides (one per line of an input).
pub fn overrides() -> Vec<Vec<u8>> {
    vec![
        b"train.lr=5e-4\nobjective.0.weight=2".to_vec(),
        b"adapter.0.tokens=8\ntrain.steps=\"x\"".to_vec(),
        b"adapter.0={type=\"lora\", rank=2}\nseed=[1,2]".to_vec(),
        b"backbone.preset=\"sd3-medium\"\ntrain.checkpoint.every=5".to_vec(),
    ]
}

/// Config files of the kinds a model folder holds.
pub fn configs() -> Vec<Vec<u8>> {
    vec![
        br#"{"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8}"#.to_vec(),
        br#"{"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 16, "scaling_factor": 0.18215}"#.to_vec(),
        br#"{"model_type": "clip_text_model", "vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "eos_token_id": 2}"#.to_vec(),
        br#"{"model_type": "t5", "vocab_size": 99, "d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu"}"#.to_vec(),
        br#"{"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "rescale_betas_zero_snr": false}"#.to_vec(),
        br#"{"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}, "metadata": {"total_size": 64}}"#.to_vec(),
        br#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": false, "alpha_pattern": {"to_q": 4}, "target_modules": ["to_q", "to_k"]}"#.to_vec(),
        br#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], "force_zeros_for_empty_prompt": true}"#.to_vec(),
        br#"{"model_max_length": 77, "pad_token": {"content": "!", "lstrip": false}, "use_attention_mask": false}"#.to_vec(),
    ]
}
