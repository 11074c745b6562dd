//! The CLIP tokenizer wrapper against Python: the word-level shapes tokenizer built here loads in
//! `tokenizers` and transformers' `PreTrainedTokenizerFast` with identical ids, and tiny
//! transformers `CLIPTokenizer` (byte-level BPE) folders load here with identical ids, both
//! padded and truncated the way diffusers calls CLIP's tokenizer. One Python run per binary
//! (`tests/python/clip_tokenizer.py`).
use crate::common;

use std::path::PathBuf;
use std::sync::OnceLock;

use softalign_backbones::clip::tokenizer::{BOS, EOS, UNK};
use softalign_backbones::clip::ClipTokenizer;
use tch::Device;

const MAX_LEN: usize = 12;

const WORDS: &[&str] = &[
    "a", "photo", "of", "red", "blue", "green", "cube", "cubes", "sphere", "spheres", "two",
    "three", "left", "right", "and", "the", ",", ".",
];

/// Lower/upper case, extra spaces, punctuation in and out of the vocabulary, an unknown word, an
/// empty prompt, and prompts longer than MAX_LEN.
const CAPTIONS: &[&str] = &[
    "a photo of a red cube",
    "Two blue spheres, left of a green cube.",
    "A   RED cube!",
    "a purple dodecahedron",
    "",
    "a red cube and a blue sphere and a green cube and two red spheres",
    "three cubes, two spheres, a cube, a sphere.",
    "a photo of the cube",
];

struct Fixtures {
    _dir: tempfile::TempDir,
    root: PathBuf,
    words: ClipTokenizer,
    results: serde_json::Value,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let words = ClipTokenizer::build_word_level(WORDS, MAX_LEN).expect("word-level tokenizer");
        words
            .save(dir.path().join("words").join("tokenizer.json"))
            .expect("save tokenizer.json");
        let spec = serde_json::json!({"captions": CAPTIONS, "max_length": MAX_LEN});
        std::fs::write(dir.path().join("captions.json"), spec.to_string()).unwrap();
        common::run_python("clip_tokenizer.py", dir.path());
        let results = common::read_json(dir.path(), "results.json");
        Fixtures {
            root: dir.path().to_path_buf(),
            _dir: dir,
            words,
            results,
        }
    })
}

fn expected(key: &str) -> Vec<Vec<i64>> {
    serde_json::from_value(fixtures().results[key].clone()).expect(key)
}

fn rust_ids(tok: &ClipTokenizer) -> Vec<Vec<i64>> {
    CAPTIONS
        .iter()
        .map(|c| tok.encode_ids(c).unwrap())
        .collect()
}

fn assert_same(what: &str, got: &[Vec<i64>], want: &[Vec<i64>]) {
    for ((c, g), w) in CAPTIONS.iter().zip(got).zip(want) {
        assert_eq!(g, w, "{what}: ids differ for {c:?}");
    }
    println!("{what}: {} captions, identical ids", got.len());
}

#[test]
fn word_level_ids_match_python_tokenizers() {
    let f = fixtures();
    assert_same(
        "word-level vs tokenizers",
        &rust_ids(&f.words),
        &expected("words_tokenizers"),
    );
}

#[test]
fn word_level_ids_match_pretrained_tokenizer_fast_as_diffusers_calls_it() {
    let f = fixtures();
    assert_same(
        "word-level vs PreTrainedTokenizerFast",
        &rust_ids(&f.words),
        &expected("words_fast"),
    );
    let (_, mask) = f.words.encode_batch(CAPTIONS, Device::Cpu).unwrap();
    let mask: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&mask).unwrap();
    assert_eq!(mask, expected("words_fast_mask"));
}

#[test]
fn word_level_layout_is_clip_like() {
    let t = &fixtures().words;
    assert_eq!((t.bos_id(), t.eos_id(), t.pad_id()), (0, 1, 1));
    assert_eq!(t.token_to_id(UNK), Some(2));
    assert_eq!(t.vocab_size(), 3 + WORDS.len());
    let ids = t.encode_ids("A photo of a RED cube").unwrap();
    let w = |s: &str| i64::from(t.token_to_id(s).unwrap());
    assert_eq!(
        &ids[..8],
        &[
            0,
            w("a"),
            w("photo"),
            w("of"),
            w("a"),
            w("red"),
            w("cube"),
            1
        ]
    );
    assert!(
        ids[8..].iter().all(|&i| i == 1),
        "padded with <|endoftext|>"
    );
    // Unknown words and punctuation outside the vocabulary become <|unk|>.
    let ids = t.encode_ids("a purple cube!").unwrap();
    assert_eq!(&ids[..6], &[0, w("a"), 2, w("cube"), 2, 1]);
    // Truncation keeps BOS and ends with EOS, as CLIP's tokenizer does for diffusers.
    let long = t.encode_ids(CAPTIONS[5]).unwrap();
    assert_eq!(long.len(), MAX_LEN);
    assert_eq!((long[0], long[MAX_LEN - 1]), (0, 1));
    assert!(!long[1..MAX_LEN - 1].contains(&1));
    assert_eq!(t.decode(&long[..4]).unwrap(), "a red cube");
    // Batch tensor.
    let ids = t.encode(&CAPTIONS[..3], Device::Cpu).unwrap();
    assert_eq!(ids.size(), [3, MAX_LEN as i64]);
    assert_eq!(ids.kind(), tch::Kind::Int64);
}

#[test]
fn word_level_saved_file_reloads_identically() {
    let f = fixtures();
    let path = f.root.join("words").join("tokenizer.json");
    let again = ClipTokenizer::from_file(&path, MAX_LEN).unwrap();
    assert_eq!(rust_ids(&again), rust_ids(&f.words));
    assert_eq!(again.pad_id(), f.words.pad_id());
}

#[test]
fn word_level_rejects_words_that_could_never_occur() {
    for bad in ["Red", "red cube", "cube.", "", EOS, "it's"] {
        let err = ClipTokenizer::build_word_level(&["a", bad], MAX_LEN);
        assert!(err.is_err(), "{bad:?} accepted");
        assert!(err.unwrap_err().to_string().contains(&format!("{bad:?}")));
    }
    assert!(ClipTokenizer::build_word_level(&["a"], 1).is_err());
    // Duplicates are dropped, keeping the first id.
    let t = ClipTokenizer::build_word_level(&["a", "b", "a"], MAX_LEN).unwrap();
    assert_eq!(t.vocab_size(), 5);
    assert_eq!(t.token_to_id(BOS), Some(0));
}

#[test]
fn clip_bpe_tokenizer_json_matches_transformers_with_eos_padding() {
    let f = fixtures();
    let tok =
        ClipTokenizer::from_file(f.root.join("bpe_eos").join("tokenizer.json"), MAX_LEN).unwrap();
    assert_eq!(
        i64::from(tok.pad_id()),
        f.results["bpe_eos_pad_id"].as_i64().unwrap()
    );
    assert_eq!(tok.pad_id(), tok.eos_id());
    // The merges apply (one id per known word), so the BPE path is really exercised.
    let red = i64::from(tok.token_to_id("red</w>").unwrap());
    let ids = tok.encode_ids("a RED cube").unwrap();
    assert_eq!(ids[2], red, "{ids:?}");
    assert_eq!(ids[4], i64::from(tok.eos_id()), "{ids:?}");
    assert_same(
        "CLIP BPE (pad <|endoftext|>)",
        &rust_ids(&tok),
        &expected("bpe_eos"),
    );
}

#[test]
fn clip_bpe_tokenizer_reads_pad_token_from_its_folder() {
    let f = fixtures();
    let tok =
        ClipTokenizer::from_file(f.root.join("bpe_bang").join("tokenizer.json"), MAX_LEN).unwrap();
    assert_eq!(tok.token_to_id("!"), Some(tok.pad_id()));
    assert_eq!(
        i64::from(tok.pad_id()),
        f.results["bpe_bang_pad_id"].as_i64().unwrap()
    );
    assert_same("CLIP BPE (pad `!`)", &rust_ids(&tok), &expected("bpe_bang"));
}
