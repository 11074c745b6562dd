//! The `shapes` dataset plugin: the world's training split, rendered once at build time to x0
//! (N, 3, 32, 32) in [-1, 1], every caption tokenized once. Each access picks one of an
//! image's captions, and drops it to the empty prompt with probability `caption_dropout` (what
//! classifier-free guidance needs), with torch's global generator, which the trainer seeds per
//! micro-step: the same seed gives the same batch.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use softalign_core::backbone::Conditioning;
use softalign_core::dataset::{Batch, Dataset};
use softalign_core::plugin::{BuildContext, DatasetSpec};
use softalign_core::{register_plugin, Error, Result};
use softalign_worlds::shapes::{to_signed_chw, train_split};
use tch::{Device, Kind, Tensor};

use super::config::{world_tokenizer, TINY_MAX_LENGTH};
use super::model::{INPUT_IDS, TOKENIZER_FILE};
use crate::clip::ClipTokenizer;

fn default_dropout() -> f64 {
    0.1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapesDataSpec {
    /// Training examples (`softalign_worlds::shapes::train_split(n, seed)`).
    pub n: usize,
    /// The split's seed (example i depends only on (seed, i)).
    #[serde(default)]
    pub seed: u64,
    /// The model's tokenizer: a pipeline folder or a tokenizer.json. Default: the world's
    /// word-level vocabulary, `max_length` ids, which is what the `tiny` preset uses.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Ids per caption (default 24, the `tiny` preset's text positions).
    #[serde(default)]
    pub max_length: Option<usize>,
    /// Probability that an access gives the empty prompt instead of a caption.
    #[serde(default = "default_dropout")]
    pub caption_dropout: f64,
}

register_plugin!(
    SHAPES_DATA_ENTRY,
    Dataset,
    "shapes",
    "The shapes world's training split, rendered in pixel space, captions as input_ids",
    r#"[data]
type = "shapes"
n = 20000
seed = 0
caption_dropout = 0.1
"#
);

impl ShapesDataSpec {
    fn max_length(&self) -> usize {
        self.max_length.unwrap_or(TINY_MAX_LENGTH as usize)
    }

    fn tokenizer(&self, ctx: &BuildContext) -> Result<ClipTokenizer> {
        match &self.tokenizer {
            None => world_tokenizer(self.max_length()),
            Some(p) => {
                let p = ctx.resolve(p);
                let file = if p.is_dir() {
                    p.join(TOKENIZER_FILE)
                } else {
                    p
                };
                ClipTokenizer::from_file(&file, self.max_length())
            }
        }
    }
}

#[typetag::serde(name = "shapes")]
impl DatasetSpec for ShapesDataSpec {
    fn validate(&self, ctx: &BuildContext) -> Result<()> {
        if self.n == 0 {
            return Err(Error::Recipe("data shapes: `n` must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.caption_dropout) {
            return Err(Error::Recipe(format!(
                "data shapes: `caption_dropout` must be in [0, 1) (got {})",
                self.caption_dropout
            )));
        }
        if let Some(p) = &self.tokenizer {
            let p = ctx.resolve(p);
            if !p.exists() {
                return Err(Error::file(&p, "tokenizer not found"));
            }
        }
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Dataset>> {
        self.validate(ctx)?;
        let tok = self.tokenizer(ctx)?;
        Ok(Box::new(ShapesData::new(
            self.n,
            self.seed,
            &tok,
            self.caption_dropout,
        )?))
    }
}

pub struct ShapesData {
    /// (N, 3, H, W) in [-1, 1].
    x0: Tensor,
    /// Every caption's ids (total captions, L).
    ids: Tensor,
    /// For each image: its first row in `ids` and how many captions it has.
    captions: Vec<(i64, i64)>,
    /// The empty prompt's ids (1, L).
    empty: Tensor,
    /// Every caption's text, rows as `ids` (what the counting objective parses).
    texts: Vec<String>,
    caption_dropout: f64,
}

impl ShapesData {
    pub fn new(n: usize, seed: u64, tok: &ClipTokenizer, caption_dropout: f64) -> Result<Self> {
        if n == 0 {
            return Err(Error::invalid("data shapes: `n` must be at least 1"));
        }
        let split = train_split(n, seed);
        let mut pixels = Vec::new();
        let mut texts: Vec<&str> = Vec::new();
        let mut captions = Vec::with_capacity(n);
        let (w, h) = split[0].image.dimensions();
        for ex in &split {
            if ex.image.dimensions() != (w, h) {
                return Err(Error::invalid("shapes split: images of different sizes"));
            }
            pixels.extend(to_signed_chw(&ex.image));
            captions.push((texts.len() as i64, ex.captions.len() as i64));
            texts.extend(ex.captions.iter().map(String::as_str));
        }
        let x0 = Tensor::from_slice(&pixels).view([n as i64, 3, h as i64, w as i64]);
        let ids = tok.encode(&texts, Device::Cpu)?;
        let eos = i64::from(tok.eos_id());
        // A caption cut short by truncation would lose its EOS and teach the wrong scene.
        let last = ids.select(1, ids.size()[1] - 1);
        let pad = i64::from(tok.pad_id());
        if pad != eos || last.ne(pad).any().int64_value(&[]) != 0 {
            let longest = texts.iter().map(|t| t.split_whitespace().count()).max();
            return Err(Error::invalid(format!(
                "data shapes: a caption fills all {} ids (longest caption: {longest:?} words); \
                 raise `max_length`",
                tok.max_length()
            )));
        }
        let empty = tok.encode(&[""], Device::Cpu)?;
        let texts = texts.into_iter().map(String::from).collect();
        Ok(Self {
            x0,
            ids,
            captions,
            empty,
            texts,
            caption_dropout,
        })
    }

    /// The images (N, 3, H, W).
    pub fn images(&self) -> &Tensor {
        &self.x0
    }

    /// Every caption's ids, in image order.
    pub fn caption_ids(&self) -> &Tensor {
        &self.ids
    }
}

impl Dataset for ShapesData {
    fn len(&self) -> usize {
        self.captions.len()
    }

    fn batch(&self, indices: &[usize], device: Device) -> Result<Batch> {
        let b = indices.len() as i64;
        // Two fixed draws per batch, in this order: which caption, whether to drop it.
        let pick = Vec::<f64>::try_from(Tensor::rand([b], (Kind::Double, Device::Cpu)))?;
        let drop = Vec::<f64>::try_from(Tensor::rand([b], (Kind::Double, Device::Cpu)))?;
        let mut rows = Vec::with_capacity(indices.len());
        let mut texts = Vec::with_capacity(indices.len());
        for (k, &i) in indices.iter().enumerate() {
            let &(start, count) = self.captions.get(i).ok_or_else(|| {
                Error::invalid(format!(
                    "data shapes: index {i} past the end ({} examples)",
                    self.captions.len()
                ))
            })?;
            let j = ((pick[k] * count as f64) as i64).min(count - 1);
            let row = if drop[k] < self.caption_dropout {
                texts.push(String::new());
                self.empty.shallow_clone()
            } else {
                texts.push(self.texts[(start + j) as usize].clone());
                self.ids.narrow(0, start + j, 1)
            };
            rows.push(row);
        }
        let idx = Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let x0 = self.x0.index_select(0, &idx).to_device(device);
        let ids = Tensor::cat(&rows, 0).to_device(device);
        Ok(Batch::pixels(x0, Conditioning::new().with(INPUT_IDS, ids)).with_texts(texts))
    }
}
