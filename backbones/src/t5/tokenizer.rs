//! The T5 tokenizer as diffusers' SD3 pipeline calls it: `tokenizer_3(prompt,
//! padding="max_length", max_length=max_sequence_length, truncation=True,
//! add_special_tokens=True)`: the pieces, `</s>`, then `<pad>` up to `max_length`; a long prompt is
//! cut so that `</s>` survives. Reads the folder's tokenizer.json (the Unigram model with its
//! normaliser and post-processor) through the `tokenizers` crate.
use std::path::Path;

use softalign_core::{Error, Result};
use tch::{Device, Tensor};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

/// diffusers' default `max_sequence_length` for SD3 (the SoftREPA reference used 512).
pub const DEFAULT_MAX_LENGTH: usize = 256;
pub const PAD: &str = "<pad>";
pub const EOS: &str = "</s>";

#[derive(Clone)]
pub struct T5Tokenizer {
    inner: Tokenizer,
    max_length: usize,
    pad_id: u32,
    eos_id: u32,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl T5Tokenizer {
    /// Loads a tokenizer.json; `path` may also be the tokenizer folder. The pad token is the one
    /// the file's own padding names, else `pad_token` of the folder's special_tokens_map.json /
    /// tokenizer_config.json, else `<pad>`.
    pub fn from_file(path: impl AsRef<Path>, max_length: usize) -> Result<Self> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path = path.join("tokenizer.json");
        }
        let inner = crate::clip::tokenizer::read_tokenizer_json(&path)?;
        let pad = match inner.get_padding() {
            Some(p) => Some(p.pad_token.clone()),
            None => match path.parent() {
                Some(dir) => crate::clip::tokenizer::named_token(dir, "pad_token")?,
                None => None,
            },
        };
        Self::from_tokenizer(inner, max_length, pad.as_deref().unwrap_or(PAD))
            .map_err(|e| Error::file(&path, e))
    }

    pub fn from_tokenizer(
        mut inner: Tokenizer,
        max_length: usize,
        pad_token: &str,
    ) -> Result<Self> {
        if max_length < 1 {
            return Err(Error::invalid("T5 max_length must be at least 1"));
        }
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| Error::invalid(format!("the vocabulary has no `{t}` token")))
        };
        let (pad_id, eos_id) = (id(pad_token)?, id(EOS)?);
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
            .map_err(|e| Error::invalid(format!("truncation: {e}")))?;
        Ok(Self {
            inner,
            max_length,
            pad_id,
            eos_id,
        })
    }

    /// One prompt as exactly `max_length` ids.
    pub fn encode_ids(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::invalid(format!("tokenizing {text:?}: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Prompts as int64 ids [B, max_length] and the attention mask (1 = token or `</s>`).
    pub fn encode_batch(&self, texts: &[&str], device: Device) -> Result<(Tensor, Tensor)> {
        let encs = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::invalid(format!("tokenizing a batch: {e}")))?;
        let mut ids = Vec::with_capacity(texts.len() * self.max_length);
        let mut mask = Vec::with_capacity(texts.len() * self.max_length);
        for e in &encs {
            ids.extend(e.get_ids().iter().map(|&i| i64::from(i)));
            mask.extend(e.get_attention_mask().iter().map(|&m| i64::from(m)));
        }
        let shape = [texts.len() as i64, self.max_length as i64];
        Ok((
            Tensor::from_slice(&ids).view(shape).to_device(device),
            Tensor::from_slice(&mask).view(shape).to_device(device),
        ))
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
