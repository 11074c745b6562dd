//! The hostile corpus: broken and malicious model files and malformed configs, built here (no
//! binary blobs), each of which must be refused with a message naming the file and the field
//! or tensor, without a panic, without running anything and without exhausting memory. What
//! the fuzzer found is kept here too (marked "fuzz finding"), and every case seeds the fuzzer.
use std::path::{Path, PathBuf};

use softalign_backbones::clip::ClipTokenizer;
use softalign_backbones::weight_file::WeightFile;

use super::seeds::{self, pickle_with, safetensors_raw, torch_zip};

/// A hostile file: its name, its bytes (or a size for a sparse file of that many bytes), and
/// what the refusal must say.
pub struct Case {
    pub what: &'static str,
    pub file: &'static str,
    pub bytes: Vec<u8>,
    pub sparse: Option<u64>,
    pub expect: &'static [&'static str],
}

fn case(
    what: &'static str,
    file: &'static str,
    bytes: Vec<u8>,
    expect: &'static [&'static str],
) -> Case {
    Case {
        what,
        file,
        bytes,
        sparse: None,
        expect,
    }
}

/// A pickle whose values double at every level: `n` levels make 2^n references to one list.
fn billion_laughs(n: u8) -> Vec<u8> {
    let mut p = b"\x80\x02]q\x00".to_vec();
    for i in 1..=n {
        p.extend_from_slice(&[b'h', i - 1, b'h', i - 1, 0x86, b'q', i]);
    }
    p.push(b'.');
    p
}

/// Lists nested `n` deep (`[[[...]]]`).
fn deep_lists(n: usize) -> Vec<u8> {
    let mut p = b"\x80\x02".to_vec();
    p.extend(std::iter::repeat_n(b']', n));
    p.extend(std::iter::repeat_n(b'a', n - 1));
    p.push(b'.');
    p
}

/// `bytes` with the central directory's uncompressed size of every member set to `size`.
fn claim_size(mut zip: Vec<u8>, size: u32) -> Vec<u8> {
    let mut i = 0;
    while i + 46 <= zip.len() {
        if zip[i..i + 4] == *b"PK\x01\x02" {
            zip[i + 24..i + 28].copy_from_slice(&size.to_le_bytes());
        }
        i += 1;
    }
    zip
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The PNG seed with its header claiming `w` x `h` (checksum fixed, so only the claim is
/// wrong).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut png = seeds::images()[0].clone();
    // Signature (8), IHDR length (4), "IHDR" (4), then width and height.
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

fn png_of(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::new(w, h);
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Broken and hostile model files.
pub fn model_files() -> Vec<Case> {
    let st = seeds::safetensors();
    let six = || vec![0u8; 24];
    let evil_stack_global =
        b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94\x8c\x0e__import__('os')\x94\x85\x94R\x94.".to_vec();
    let evil_inst = b"(S'rm -rf /'\nisubprocess\nPopen\n.".to_vec();
    let mut v = vec![
        // safetensors
        case(
            "a header claiming 2^40 bytes",
            "huge-header.safetensors",
            {
                let mut b = (1u64 << 40).to_le_bytes().to_vec();
                b.extend_from_slice(b"{}");
                b
            },
            &["huge-header.safetensors", "not a valid safetensors"],
        ),
        case(
            "a header past the end of the file",
            "short-header.safetensors",
            {
                let mut b = 4096u64.to_le_bytes().to_vec();
                b.extend_from_slice(br#"{"a":"#);
                b
            },
            &["short-header.safetensors", "not a valid safetensors"],
        ),
        case(
            "offsets past the data",
            "out-of-range.safetensors",
            safetensors_raw(
                r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,1099511627776]}}"#,
                24,
            ),
            &["out-of-range.safetensors", "not a valid safetensors"],
        ),
        case(
            "overlapping tensors",
            "overlap.safetensors",
            safetensors_raw(
                r#"{"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]},"b":{"dtype":"F32","shape":[6],"data_offsets":[8,32]}}"#,
                32,
            ),
            &["overlap.safetensors", "not a valid safetensors"],
        ),
        case(
            "a shape that does not match its bytes",
            "shape-bytes.safetensors",
            safetensors_raw(
                r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,8]}}"#,
                8,
            ),
            &["shape-bytes.safetensors", "not a valid safetensors"],
        ),
        case(
            "a shape whose size overflows",
            "overflow.safetensors",
            safetensors_raw(
                r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,0]}}"#,
                0,
            ),
            &["overflow.safetensors", "not a valid safetensors"],
        ),
        case(
            "an unknown dtype",
            "dtype.safetensors",
            safetensors_raw(
                r#"{"w":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#,
                16,
            ),
            &["dtype.safetensors", "not a valid safetensors"],
        ),
        case(
            "a header that is not JSON",
            "not-json.safetensors",
            safetensors_raw("{not json}      ", 0),
            &["not-json.safetensors", "not a valid safetensors"],
        ),
        case(
            "a truncated file",
            "truncated.safetensors",
            st[..st.len() - 7].to_vec(),
            &["truncated.safetensors", "not a valid safetensors"],
        ),
        case(
            "an empty file",
            "empty.safetensors",
            Vec::new(),
            &["empty.safetensors", "not a valid safetensors"],
        ),
        case(
            "a hole between tensors",
            "hole.safetensors",
            safetensors_raw(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
                12,
            ),
            &["hole.safetensors", "not a valid safetensors"],
        ),
        // torch.save zips
        case(
            "a pickle calling os.system (GLOBAL + REDUCE)",
            "os-system.bin",
            torch_zip(
                b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.",
                &[],
            ),
            &["os-system.bin", "os.system", "refusing"],
        ),
        case(
            "a pickle importing builtins.eval (STACK_GLOBAL)",
            "eval.bin",
            torch_zip(&evil_stack_global, &[]),
            &["eval.bin", "builtins.eval", "refusing"],
        ),
        case(
            "a pickle building subprocess.Popen (INST)",
            "popen.bin",
            torch_zip(&evil_inst, &[]),
            &["popen.bin", "subprocess.Popen", "refusing"],
        ),
        case(
            "a member path that climbs out of the archive",
            "traversal.bin",
            torch_zip(
                &seeds::pickle(),
                &[
                    ("archive/data/0", six()),
                    ("../../etc/cron.d/x", b"* * * * * root sh".to_vec()),
                ],
            ),
            &["traversal.bin", "../../etc/cron.d/x", "path traversal"],
        ),
        case(
            "a member claiming 4 GB (a zip bomb)",
            "bomb.bin",
            claim_size(seeds::torch_bin(), 0xFFFF_FFF0),
            &["bomb.bin", "claims 4294967280 bytes", "zip bomb"],
        ),
        case(
            "a deflated member (no torch.save writes one)",
            "deflate.bin",
            {
                use std::io::Write;
                let mut buf = std::io::Cursor::new(Vec::new());
                let mut zw = zip::ZipWriter::new(&mut buf);
                let opts = zip::write::FileOptions::default()
                    .compression_method(zip::CompressionMethod::Stored);
                zw.start_file("archive/data.pkl", opts).unwrap();
                zw.write_all(&seeds::pickle()).unwrap();
                zw.finish().unwrap();
                drop(zw);
                let mut b = buf.into_inner();
                // Compression method 8 (deflate) in the local and central headers.
                for i in 0..b.len().saturating_sub(12) {
                    if b[i..i + 4] == *b"PK\x03\x04" {
                        b[i + 8] = 8;
                    }
                    if b[i..i + 4] == *b"PK\x01\x02" {
                        b[i + 10] = 8;
                    }
                }
                b
            },
            &["deflate.bin", "archive member `archive/data.pkl`"],
        ),
        case(
            "references doubling 64 times (billion laughs)",
            "laughs.bin",
            torch_zip(&billion_laughs(64), &[]),
            &["laughs.bin", "refer to each other"],
        ),
        case(
            "values nested 100000 deep",
            "deep.bin",
            torch_zip(&deep_lists(100_000), &[]),
            &["deep.bin", "more than 256 deep"],
        ),
        case(
            "a tensor reaching past its storage",
            "past-storage.bin",
            torch_zip(
                &pickle_with("torch._utils\n_rebuild_tensor_v2", (2, 3), (3, 1), 5),
                &[("archive/data/0", six())],
            ),
            &["past-storage.bin", "tensor `w`", "reaches element"],
        ),
        case(
            "a view of 65025 elements over a storage of 6",
            "expanded.bin",
            torch_zip(
                &pickle_with("torch._utils\n_rebuild_tensor_v2", (255, 255), (0, 0), 0),
                &[("archive/data/0", six())],
            ),
            &["expanded.bin", "tensor `w`", "refusing to materialise"],
        ),
        case(
            "a storage key that is a path",
            "storage-path.bin",
            torch_zip(
                &seeds::pickle().replace_once(b"X\x01\x00\x00\x000", b"X\x04\x00\x00\x00../0"),
                &[("archive/data/0", six())],
            ),
            &["storage-path.bin", "is not a plain name"],
        ),
        case(
            "a missing storage",
            "no-storage.bin",
            torch_zip(&seeds::pickle(), &[]),
            &["no-storage.bin", "archive/data/0"],
        ),
        case(
            "not a zip at all",
            "random.bin",
            b"\x80\x02}q\x00.".to_vec(),
            &["random.bin", "not a zip archive"],
        ),
        case(
            "a storage of a partial element",
            "partial.bin",
            torch_zip(&seeds::pickle(), &[("archive/data/0", vec![0u8; 23])]),
            &["partial.bin", "whole number of elements"],
        ),
        // tokenizers
        Case {
            what: "a tokenizer.json of 4 GiB",
            file: "tokenizer.json",
            bytes: Vec::new(),
            sparse: Some(4 << 30),
            expect: &["tokenizer.json", "4294967296 bytes", "refusing"],
        },
        case(
            "a tokenizer.json with an unknown model",
            "tokenizer.json",
            String::from_utf8(seeds::tokenizer_json())
                .unwrap()
                .replace("\"BPE\"", "\"Nope\"")
                .into_bytes(),
            &["tokenizer.json", "not a tokenizers tokenizer.json"],
        ),
        case(
            "a tokenizer without CLIP's special tokens",
            "tokenizer.json",
            String::from_utf8(seeds::tokenizer_json())
                .unwrap()
                .replace("<|endoftext|>", "<eos>")
                .into_bytes(),
            &["tokenizer.json", "<|endoftext|>"],
        ),
        // images
        case(
            "a PNG header claiming 100000 x 100000",
            "huge.png",
            png_claiming(100_000, 100_000),
            &["huge.png", "cannot decode"],
        ),
        case(
            "a 1 x 4000 strip (an 8M-pixel resize)",
            "strip.png",
            png_of(1, 4000),
            &["strip.png", "aspect ratio"],
        ),
        case(
            "a truncated JPEG",
            "cut.jpg",
            {
                let j = seeds::images()[1].clone();
                j[..j.len() / 2].to_vec()
            },
            &["cut.jpg", "cannot decode"],
        ),
        // a sharded index
        case(
            "an index naming a shard outside its folder",
            "m.safetensors.index.json",
            br#"{"weight_map": {"a.weight": "../../../etc/passwd"}}"#.to_vec(),
            &[
                "m.safetensors.index.json",
                "field `weight_map.a.weight`",
                "not a file name in this folder",
            ],
        ),
    ];
    // The fuzz findings (see fuzz/mod.rs), kept as cases.
    v.extend(findings());
    v
}

/// What the fuzzer found, each a regression case.
/// The JPEG seed with its frame header (SOF0) claiming `w` x `h`; the scan data stays that of
/// the 5 x 2 image, and the decoder fills the rest.
pub fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut j = seeds::images()[1].clone();
    let at = j
        .windows(2)
        .position(|m| m == [0xFF, 0xC0])
        .expect("a baseline JPEG");
    // Marker (2), length (2), precision (1), then height and width.
    j[at + 5..at + 7].copy_from_slice(&h.to_be_bytes());
    j[at + 7..at + 9].copy_from_slice(&w.to_be_bytes());
    j
}

fn findings() -> Vec<Case> {
    let tok = String::from_utf8(seeds::tokenizer_json()).unwrap();
    vec![
        // A few hundred bytes of JPEG claiming 16000 x 16000 decoded into a 768 MB image whose
        // resize took minutes.
        case(
            "a 600-byte JPEG claiming 16000 x 16000",
            "claim.jpg",
            jpeg_claiming(16000, 16000),
            &["claim.jpg", "larger than softalign decodes"],
        ),
        // tokenizers 0.23 panicked (`expect("Helper")`) on a syntax error inside `decoder`.
        case(
            "a JSON syntax error inside the tokenizer's decoder",
            "tokenizer.json",
            tok.replacen(
                "\"decoder\":null",
                "\"decoder\":{\"type\":\"BPEDecoder\" \"suffix\":\"</w>\"}",
                1,
            )
            .into_bytes(),
            &["tokenizer.json", "not valid JSON"],
        ),
    ]
}

trait ReplaceOnce {
    fn replace_once(&self, from: &[u8], to: &[u8]) -> Vec<u8>;
}
impl ReplaceOnce for Vec<u8> {
    fn replace_once(&self, from: &[u8], to: &[u8]) -> Vec<u8> {
        let at = self
            .windows(from.len())
            .position(|w| w == from)
            .expect("pattern present");
        let mut out = self[..at].to_vec();
        out.extend_from_slice(to);
        out.extend_from_slice(&self[at + from.len()..]);
        out
    }
}

/// Opens `path` with the reader its name calls for.
fn open(path: &Path) -> Result<(), String> {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let r = if name.ends_with(".safetensors") || name.ends_with(".bin") {
        WeightFile::open(path).map(drop).map_err(|e| e.to_string())
    } else if name == "tokenizer.json" {
        ClipTokenizer::from_file(path, 77)
            .map(drop)
            .map_err(|e| e.to_string())
    } else if name.ends_with(".png") || name.ends_with(".jpg") {
        softalign_core::dataset::captioned::preprocess::load_square(path, 16)
            .map(drop)
            .map_err(|e| e.to_string())
    } else if name.ends_with(".index.json") {
        softalign_backbones::weights::weight_files(path.parent().unwrap(), "m")
            .map(drop)
            .map_err(|e| e.to_string())
    } else {
        panic!("no reader for {name}")
    };
    r
}

fn write(dir: &Path, c: &Case) -> PathBuf {
    let p = dir.join(c.file);
    match c.sparse {
        Some(n) => std::fs::File::create(&p).unwrap().set_len(n).unwrap(),
        None => std::fs::write(&p, &c.bytes).unwrap(),
    }
    p
}

/// Runs every case in its own folder; returns the failures.
fn refuse_all(cases: Vec<Case>, run: impl Fn(&Path, &Case) -> Result<(), String>) -> Vec<String> {
    let mut failures = Vec::new();
    for c in &cases {
        let dir = tempfile::tempdir().unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(dir.path(), c)));
        match outcome {
            Err(_) => failures.push(format!("{}: panicked", c.what)),
            Ok(Ok(())) => failures.push(format!("{}: accepted", c.what)),
            Ok(Err(msg)) => {
                let missing: Vec<_> = c.expect.iter().filter(|e| !msg.contains(**e)).collect();
                if !missing.is_empty() {
                    failures.push(format!("{}: missing {missing:?} in: {msg}", c.what));
                }
            }
        }
    }
    failures
}

/// The largest image a header may claim decodes and crops in bounded time and memory. Seconds
/// of work by design, so not in the suite: `scripts/fuzz.sh` runs it.
#[test]
#[ignore]
fn the_largest_image_allowed_decodes_in_bounded_time() {
    let t = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.jpg");
    std::fs::write(&p, jpeg_claiming(8192, 4096)).unwrap();
    let (img, peak) = super::alloc::tracked(|| {
        softalign_core::dataset::captioned::preprocess::load_square(&p, 16)
    });
    assert_eq!(img.unwrap().dimensions(), (16, 16));
    assert!(peak <= 256 << 20, "{peak}");
    assert!(t.elapsed().as_secs() < 30, "{:?}", t.elapsed());
}

#[test]
fn hostile_model_files_are_refused_by_name() {
    let cases = model_files();
    assert!(cases.len() >= 20, "{} cases", cases.len());
    let failures = refuse_all(cases, |dir, c| open(&write(dir, c)));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Malformed configs of the kinds a model folder holds: (what, file, text, reader, expected).
type Reader = fn(&Path) -> Result<(), String>;

fn s<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<(), String> {
    r.map(drop).map_err(|e| e.to_string())
}

fn read_unet(p: &Path) -> Result<(), String> {
    s(softalign_backbones::unet::UNetConfig::from_file(p))
}
fn read_vae(p: &Path) -> Result<(), String> {
    s(softalign_backbones::vae::VaeConfig::from_file(p))
}
fn read_sd3(p: &Path) -> Result<(), String> {
    s(softalign_backbones::sd3::Sd3Config::from_file(p))
}
fn read_clip(p: &Path) -> Result<(), String> {
    s(softalign_backbones::clip::ClipTextConfig::from_file(p))
}
fn read_t5(p: &Path) -> Result<(), String> {
    s(softalign_backbones::t5::T5Config::from_file(p))
}
fn read_pipeline(p: &Path) -> Result<(), String> {
    let f = softalign_backbones::pipeline::PipelineFolder::open(p.parent().unwrap())
        .map_err(|e| e.to_string())?
        .unwrap();
    s(f.flag("force_zeros_for_empty_prompt"))
}
fn read_tokenizer_dir(p: &Path) -> Result<(), String> {
    let dir = p.parent().unwrap();
    std::fs::write(dir.join("tokenizer.json"), seeds::tokenizer_json()).unwrap();
    s(softalign_backbones::pipeline::folder::tokenizer_max_length(
        dir,
    ))
    .and_then(|_| s(ClipTokenizer::from_folder(dir, 77)))
}
fn read_peft(p: &Path) -> Result<(), String> {
    let dir = p.parent().unwrap();
    let q = "base_model.model.transformer_blocks.0.attn.to_q";
    softalign_core::tensors::save_safetensors(
        dir.join("adapter_model.safetensors"),
        &[
            (
                format!("{q}.lora_A.weight"),
                tch::Tensor::zeros([4, 16], tch::kind::FLOAT_CPU),
            ),
            (
                format!("{q}.lora_B.weight"),
                tch::Tensor::zeros([16, 4], tch::kind::FLOAT_CPU),
            ),
        ],
        &Default::default(),
    )
    .unwrap();
    let ctx = softalign_core::adapter::lora::files::ReadContext {
        default_component: "transformer".into(),
        modules: [(
            "transformer".to_string(),
            vec!["transformer_blocks.0.attn.to_q".to_string()],
        )]
        .into(),
        unet_layers_per_block: None,
    };
    s(softalign_core::adapter::lora::files::read(dir, &ctx))
}
fn read_index(p: &Path) -> Result<(), String> {
    s(softalign_backbones::weights::weight_files(
        p.parent().unwrap(),
        "m",
    ))
}
fn read_state(p: &Path) -> Result<(), String> {
    s(softalign_core::train::checkpoint::read_checkpoint(
        p.parent().unwrap(),
    ))
}

pub fn configs() -> Vec<(
    &'static str,
    &'static str,
    String,
    Reader,
    &'static [&'static str],
)> {
    let unet = String::from_utf8(seeds::configs()[0].clone()).unwrap();
    let vae = String::from_utf8(seeds::configs()[1].clone()).unwrap();
    let clip = String::from_utf8(seeds::configs()[2].clone()).unwrap();
    let t5 = String::from_utf8(seeds::configs()[3].clone()).unwrap();
    let r = |t: &str, a: &str, b: &str| t.replacen(a, b, 1);
    vec![
        ("a number as text", "config.json", r(&unet, "\"layers_per_block\": 1", "\"layers_per_block\": \"eight\""), read_unet as Reader,
            &["config.json", "field `layers_per_block`", "expected one value or one per block"]),
        ("a number as text (VAE)", "config.json", r(&vae, "\"layers_per_block\": 1", "\"layers_per_block\": \"eight\""), read_vae,
            &["config.json", "field `layers_per_block`", "invalid type: string \"eight\", expected i64"]),
        ("a list element of the wrong type", "config.json", r(&unet, "[32, 64]", "[32, \"64\"]"), read_unet,
            &["config.json", "field `block_out_channels[1]`"]),
        ("a misspelt key", "config.json", r(&unet, "\"layers_per_block\"", "\"layers_per_blok\""), read_unet,
            &["config.json", "layers_per_blok"]),
        ("another model's class", "config.json", r(&unet, "UNet2DConditionModel", "UNet3DConditionModel"), read_unet,
            &["config.json", "`_class_name` is `UNet3DConditionModel`"]),
        ("a list where a number goes", "config.json", r(&vae, "\"latent_channels\": 4", "\"latent_channels\": [4]"), read_vae,
            &["config.json", "field `latent_channels`"]),
        ("a float where an integer goes", "config.json", r(&vae, "\"layers_per_block\": 1", "\"layers_per_block\": 1.5"), read_vae,
            &["config.json", "field `layers_per_block`"]),
        ("an SD3 config that is a list", "config.json", "[1, 2, 3]".into(), read_sd3,
            &["config.json", "not a JSON object"]),
        ("a CLIP size as text", "config.json", r(&clip, "\"hidden_size\": 32", "\"hidden_size\": \"32\""), read_clip,
            &["config.json", "field `hidden_size`"]),
        ("a CLIP activation that does not exist", "config.json", r(&clip, "quick_gelu", "swishy"), read_clip,
            &["config.json", "`hidden_act`", "swishy"]),
        ("a T5 width as text", "config.json", r(&t5, "\"d_model\": 32", "\"d_model\": \"big\""), read_t5,
            &["config.json", "field `d_model`"]),
        ("a config that is not JSON", "config.json", "{\"sample_size\": 8,".into(), read_unet,
            &["config.json", "not valid JSON", "line 1"]),
        ("model_index.json with a flag as text", "model_index.json",
            r#"{"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": "yes"}"#.into(), read_pipeline,
            &["model_index.json", "field `force_zeros_for_empty_prompt`"]),
        ("model_index.json that is not an object", "model_index.json", "\"StableDiffusionPipeline\"".into(), read_pipeline,
            &["model_index.json", "not a JSON object"]),
        ("tokenizer_config.json with a length as text", "tokenizer_config.json",
            r#"{"model_max_length": "77"}"#.into(), read_tokenizer_dir,
            &["tokenizer_config.json", "field `model_max_length`"]),
        ("special_tokens_map.json with a number for a token", "special_tokens_map.json",
            r#"{"pad_token": 5}"#.into(), read_tokenizer_dir,
            &["special_tokens_map.json", "field `pad_token`"]),
        ("special_tokens_map.json with a token object without content", "special_tokens_map.json",
            r#"{"pad_token": {"lstrip": false}}"#.into(), read_tokenizer_dir,
            &["special_tokens_map.json", "field `pad_token.content`"]),
        ("adapter_config.json with lora_alpha as text", "adapter_config.json",
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": "sixteen"}"#.into(), read_peft,
            &["adapter_config.json", "field `lora_alpha`", "expected f64"]),
        ("adapter_config.json with an alpha_pattern value as text", "adapter_config.json",
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"to_q": "x"}}"#.into(), read_peft,
            &["adapter_config.json", "field `alpha_pattern.to_q`"]),
        ("adapter_config.json with use_rslora as text", "adapter_config.json",
            r#"{"peft_type": "LORA", "r": 4, "use_rslora": "yes"}"#.into(), read_peft,
            &["adapter_config.json", "field `use_rslora`"]),
        ("a weight index with a number for a shard", "m.safetensors.index.json",
            r#"{"weight_map": {"a.weight": 5}}"#.into(), read_index,
            &["m.safetensors.index.json", "field `weight_map.a.weight`"]),
        ("a weight index without weight_map", "m.safetensors.index.json",
            r#"{"metadata": {}}"#.into(), read_index,
            &["m.safetensors.index.json", "weight_map"]),
        ("a checkpoint state.json with a step as text", "state.json",
            r#"{"step": "ten", "seed": 1, "bad_steps_in_row": 0, "skipped_steps": 0, "recipe_hash": "h", "softalign_version": "0"}"#.into(), read_state,
            &["state.json", "field `step`"]),
    ]
}

#[test]
fn malformed_configs_are_refused_naming_file_and_field() {
    let all = configs();
    assert!(all.len() >= 20, "{} cases", all.len());
    let mut failures = Vec::new();
    for (what, file, text, reader, expect) in all {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(file);
        std::fs::write(&p, &text).unwrap();
        match std::panic::catch_unwind(|| reader(&p)) {
            Err(_) => failures.push(format!("{what}: panicked")),
            Ok(Ok(())) => failures.push(format!("{what}: accepted")),
            Ok(Err(msg)) => {
                let missing: Vec<_> = expect.iter().filter(|e| !msg.contains(**e)).collect();
                if !missing.is_empty() {
                    failures.push(format!("{what}: missing {missing:?} in: {msg}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Extra fuzz seeds per target: the corpus's files of that kind.
pub fn seeds_for(target: &str) -> Vec<Vec<u8>> {
    let of = |ext: &str| -> Vec<Vec<u8>> {
        model_files()
            .into_iter()
            .filter(|c| c.sparse.is_none() && c.file.ends_with(ext))
            .map(|c| c.bytes)
            .collect()
    };
    match target {
        "safetensors" => of(".safetensors"),
        "torch_zip" => of(".bin"),
        "pickle" => vec![billion_laughs(8), deep_lists(300)],
        "tokenizer" => of("tokenizer.json"),
        "image" => [of(".png"), of(".jpg")].concat(),
        "weight_index" => of(".index.json"),
        "config" => configs().into_iter().map(|c| c.2.into_bytes()).collect(),
        _ => Vec::new(),
    }
}

/// Through the command line (`import-tokens` reads a torch pickle): a clean exit 1 naming the
/// file, never a panic's 101.
#[test]
fn the_cli_refuses_hostile_pickles_with_a_message() {
    let files = model_files();
    for name in ["os-system.bin", "laughs.bin"] {
        let c = files.iter().find(|c| c.file == name).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("dc_tokens.pth"), &c.bytes).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_softalign"))
            .arg("import-tokens")
            .arg(dir.path())
            .args(["--backbone", "sd3", "--output"])
            .arg(dir.path().join("out.safetensors"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains("dc_tokens.pth"), "{name}: {stderr}");
        assert!(!dir.path().join("out.safetensors").exists());
    }
}
