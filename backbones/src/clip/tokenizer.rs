//! CLIP tokenization as diffusers calls it: `tokenizer(prompt, padding="max_length",
//! max_length=tokenizer.model_max_length, truncation=True)`: `<|startoftext|>`, the tokens,
//! `<|endoftext|>`, then the pad token up to `max_length`; a long prompt is cut so that BOS and
//! EOS survive. Wraps the `tokenizers` crate, so any tokenizer.json (CLIP's byte-level BPE, or
//! the word-level vocabulary built here for the shapes world) loads and saves unchanged.
use std::path::Path;

use softalign_core::{json_file, Error, Result};
use tch::{Device, Kind, Tensor};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";
/// The word-level vocabulary's unknown token (CLIP's BPE has no unknowns: it falls back to
/// bytes).
pub const UNK: &str = "<|unk|>";

/// A tokenizer that pads and truncates every prompt to `max_length` ids.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("max_length", &self.max_length)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

fn tok_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("{what}: {e}"))
}

/// A special token (`pad_token`, ...) a transformers tokenizer folder names in
/// special_tokens_map.json or tokenizer_config.json (a string, or an AddedToken object with
/// `content`). Shared by the CLIP and T5 tokenizers.
pub(crate) fn named_token(dir: &Path, key: &str) -> Result<Option<String>> {
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let json = softalign_core::json_file::read_value(&path)?;
        let tok = match json.get(key) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => match o.get("content") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                _ => {
                    return Err(Error::file(
                        &path,
                        format!("field `{key}.content`: expected the token's text"),
                    ))
                }
            },
            Some(other) => {
                return Err(Error::file(
                    &path,
                    format!(
                    "field `{key}`: expected a token (text or {{\"content\": ...}}), got {other}"
                ),
                ))
            }
        };
        if tok.is_some() {
            return Ok(tok);
        }
    }
    Ok(None)
}

/// A `tokenizers` tokenizer.json, refused unread when it is larger than any real one (shared
/// by the CLIP and T5 tokenizers).
pub(crate) fn read_tokenizer_json(path: &Path) -> Result<Tokenizer> {
    let text = json_file::read_text(path, json_file::MAX_TOKENIZER_BYTES)?;
    // tokenizers 0.23 panics (`expect("Helper")`) on a JSON syntax error inside `decoder`, as
    // a truncated download has (a fuzz finding): the syntax is checked first, and a panic
    // that still escapes is an error like any other.
    serde_json::from_str::<serde::de::IgnoredAny>(&text)
        .map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
    let parsed = std::panic::catch_unwind(|| text.parse::<Tokenizer>()).map_err(|_| {
        Error::file(
            path,
            "not a tokenizers tokenizer.json (its reader panicked)",
        )
    })?;
    parsed.map_err(|e| Error::file(path, format!("not a tokenizers tokenizer.json: {e}")))
}

impl ClipTokenizer {
    /// Loads a tokenizer.json. The pad token is, in this order: the one the file's own
    /// `padding` names, the `pad_token` of special_tokens_map.json / tokenizer_config.json next
    /// to it (SD 2.x and SDXL's second tokenizer pad with `!`), else `<|endoftext|>` as
    /// openai/clip-vit-large-patch14 does.
    pub fn from_file(path: impl AsRef<Path>, max_length: usize) -> Result<Self> {
        let path = path.as_ref();
        let inner = read_tokenizer_json(path)?;
        let pad = match inner.get_padding() {
            Some(p) => Some(p.pad_token.clone()),
            None => match path.parent() {
                Some(dir) => named_token(dir, "pad_token")?,
                None => None,
            },
        };
        Self::from_tokenizer(inner, max_length, pad.as_deref().unwrap_or(EOS))
            .map_err(|e| Error::file(path, e))
    }

    /// Loads a tokenizer folder as diffusers ships it: tokenizer.json when present, else the
    /// `vocab.json` + `merges.txt` pair (the SD 1.5 / SDXL / SD3 `tokenizer*` folders), built
    /// into the pipeline transformers' `CLIPTokenizer` uses (NFC, whitespace collapse,
    /// lowercase; CLIP's split regex then byte-level; BPE with `</w>`; BOS ... EOS).
    pub fn from_folder(dir: impl AsRef<Path>, max_length: usize) -> Result<Self> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_file(&json, max_length);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if !vocab.is_file() || !merges.is_file() {
            return Err(Error::file(
                dir,
                "holds neither tokenizer.json nor vocab.json + merges.txt",
            ));
        }
        let inner = bpe_from_files(&vocab, &merges)?;
        let pad = named_token(dir, "pad_token")?;
        Self::from_tokenizer(inner, max_length, pad.as_deref().unwrap_or(EOS))
            .map_err(|e| Error::file(dir, e))
    }

    /// Wraps a tokenizer and sets its padding and truncation to `max_length`.
    pub fn from_tokenizer(
        mut inner: Tokenizer,
        max_length: usize,
        pad_token: &str,
    ) -> Result<Self> {
        if max_length < 2 {
            return Err(Error::invalid(format!(
                "max_length {max_length} leaves no room for BOS and EOS"
            )));
        }
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| Error::invalid(format!("the vocabulary has no `{t}` token")))
        };
        let (bos_id, eos_id, pad_id) = (id(BOS)?, id(EOS)?, id(pad_token)?);
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad_token.to_string(),
        }));
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| tok_err("truncation", e))?;
        Ok(Self {
            inner,
            max_length,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    /// A word-level tokenizer for a closed vocabulary (the shapes world): ids 0, 1, 2 are
    /// `<|startoftext|>`, `<|endoftext|>` (also the pad token, as in CLIP) and `<|unk|>`, then
    /// `words` in order (duplicates dropped). Text is NFC-normalised and lowercased, split on
    /// whitespace, and every punctuation character becomes its own word; so `words` must be
    /// lowercase, without whitespace, and either one punctuation character or free of them.
    pub fn build_word_level(words: &[&str], max_length: usize) -> Result<Self> {
        let mut vocab = serde_json::Map::new();
        for (i, t) in [BOS, EOS, UNK].iter().enumerate() {
            vocab.insert((*t).into(), i.into());
        }
        for w in words {
            check_word(w)?;
            if !vocab.contains_key(*w) {
                let id = vocab.len();
                vocab.insert((*w).into(), id.into());
            }
        }
        let special = |id: usize, t: &str| {
            serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        };
        let tok = |t: &str| serde_json::json!({"SpecialToken": {"id": t, "type_id": 0}});
        let seq = |s: &str, ty: u32| serde_json::json!({"Sequence": {"id": s, "type_id": ty}});
        let spec = |t: &str, id: usize| serde_json::json!({"id": t, "ids": [id], "tokens": [t]});
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(0, BOS), special(1, EOS), special(2, UNK)],
            "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "WhitespaceSplit"},
                {"type": "Punctuation", "behavior": "Isolated"}
            ]},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [tok(BOS), seq("A", 0), tok(EOS)],
                "pair": [tok(BOS), seq("A", 0), tok(EOS), seq("B", 1), tok(EOS)],
                "special_tokens": {BOS: spec(BOS, 0), EOS: spec(EOS, 1)}
            },
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK}
        });
        let bytes = serde_json::to_vec(&json).expect("json serialises");
        let inner = Tokenizer::from_bytes(bytes).map_err(|e| tok_err("word-level tokenizer", e))?;
        // A word the normaliser or pre-tokenizer would alter or split could never be produced;
        // running it through the pipeline is the exact test.
        for w in words {
            let enc = inner
                .encode(*w, false)
                .map_err(|e| tok_err(format!("tokenizing {w:?}"), e))?;
            let want = vocab[*w].as_u64().expect("ids are numbers") as u32;
            if enc.get_ids() != [want] {
                return Err(Error::invalid(format!(
                    "vocabulary word {w:?} would be split into {:?} (punctuation is split off)",
                    enc.get_tokens()
                )));
            }
        }
        Self::from_tokenizer(inner, max_length, EOS)
    }

    /// Writes tokenizer.json (with its padding and truncation, so Python's `tokenizers` gives the
    /// same fixed-length ids without further set-up).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = self
            .inner
            .to_string(true)
            .map_err(|e| Error::file(path, format!("serialising the tokenizer: {e}")))?;
        softalign_core::tensors::write_atomic(path, text.as_bytes())
    }

    /// tokenizer.json's text: what decides the ids (encoding caches fingerprint it).
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| Error::invalid(format!("serialising the tokenizer: {e}")))
    }

    /// One prompt as exactly `max_length` ids.
    pub fn encode_ids(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| tok_err(format!("tokenizing {text:?}"), e))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Prompts as int64 ids [B, max_length] and their attention mask [B, max_length] (1 for
    /// BOS, tokens and EOS, 0 for padding).
    pub fn encode_batch(&self, texts: &[&str], device: Device) -> Result<(Tensor, Tensor)> {
        let encs = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| tok_err("tokenizing a batch", e))?;
        let mut ids = Vec::with_capacity(texts.len() * self.max_length);
        let mut mask = Vec::with_capacity(texts.len() * self.max_length);
        for e in &encs {
            ids.extend(e.get_ids().iter().map(|&i| i64::from(i)));
            mask.extend(e.get_attention_mask().iter().map(|&m| i64::from(m)));
        }
        let shape = [texts.len() as i64, self.max_length as i64];
        let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
        let mask = Tensor::from_slice(&mask).view(shape).to_device(device);
        Ok((ids, mask))
    }

    /// Prompts as int64 ids [B, max_length].
    pub fn encode(&self, texts: &[&str], device: Device) -> Result<Tensor> {
        Ok(self.encode_batch(texts, device)?.0.to_kind(Kind::Int64))
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&i| u32::try_from(i).map_err(|_| Error::invalid(format!("id {i} is negative"))))
            .collect::<Result<_>>()?;
        self.inner
            .decode(&ids, true)
            .map_err(|e| tok_err("decoding", e))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The wrapped `tokenizers` object.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// CLIP's byte-level BPE from vocab.json + merges.txt, with the normaliser, pre-tokenizer,
/// post-processor and decoder transformers 5.23's `CLIPTokenizer` builds.
fn bpe_from_files(vocab_path: &Path, merges_path: &Path) -> Result<Tokenizer> {
    let text = json_file::read_text(vocab_path, json_file::MAX_TOKENIZER_BYTES)?;
    let vocab: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
        .map_err(|e| Error::file(vocab_path, format!("not a JSON object of ids: {e}")))?;
    let text = json_file::read_text(merges_path, json_file::MAX_TOKENIZER_BYTES)?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split(' ').collect();
        if parts.len() != 2 {
            return Err(Error::file(
                merges_path,
                format!(
                    "line {}: expected two space-separated symbols, got {line:?}",
                    n + 1
                ),
            ));
        }
        merges.push(serde_json::json!(parts));
    }
    let id = |t: &str| {
        vocab
            .get(t)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| Error::file(vocab_path, format!("no `{t}` token")))
    };
    let (bos, eos) = (id(BOS)?, id(EOS)?);
    let special = |id: u64, t: &str| {
        serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(bos, BOS), special(eos, EOS)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed",
             "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
             "use_regex": true}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [EOS, eos], "cls": [BOS, bos],
            "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
            "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": EOS,
            "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    let bytes = serde_json::to_vec(&json).expect("json serialises");
    Tokenizer::from_bytes(bytes)
        .map_err(|e| Error::file(vocab_path, format!("building the BPE: {e}")))
}

/// CLIP's word split (transformers' `CLIPTokenizer`).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

fn check_word(w: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::invalid(format!("vocabulary word {w:?} {why}")));
    if w.is_empty() {
        return bad("is empty");
    }
    if w.chars().any(char::is_whitespace) {
        return bad("contains whitespace (the pre-tokenizer splits there)");
    }
    if w.chars().any(char::is_uppercase) {
        return bad("has upper-case letters (text is lowercased first)");
    }
    if [BOS, EOS, UNK].contains(&w) {
        return bad("is a special token");
    }
    Ok(())
}
