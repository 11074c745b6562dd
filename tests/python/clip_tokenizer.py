"""Reference ids for the CLIP tokenizer tests.

usage: clip_tokenizer.py DIR

Reads DIR/captions.json ({"captions": [...], "max_length": N}) and DIR/words/tokenizer.json (the
word-level tokenizer the Rust side built). Writes DIR/results.json with
- words_tokenizers: ids from Python `tokenizers` (the file's own padding and truncation),
- words_fast, words_fast_mask: transformers' PreTrainedTokenizerFast called as diffusers calls
  CLIP's tokenizer (padding="max_length", max_length=N, truncation=True),
- bpe_<pad>: ids from a tiny transformers CLIPTokenizer (byte-level BPE, CLIP's normaliser,
  pre-tokenizer and post-processor) saved to DIR/bpe_<pad>/ with pad token `<|endoftext|>`
  (openai CLIP-L) or `!` (SD 2.x / SDXL's second tokenizer), called the same way.
"""
import json
import os
import sys

from tiny_bpe import bpe_vocab_merges
from tokenizers import Tokenizer
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

BPE_WORDS = ["a", "photo", "of", "red", "blue", "green", "cube", "cubes", "sphere", "two",
             "left", "and", "the"]


def tiny_clip_bpe():
    return bpe_vocab_merges(BPE_WORDS)


def main(d):
    with open(os.path.join(d, "captions.json")) as f:
        spec = json.load(f)
    captions, n = spec["captions"], spec["max_length"]
    res = {}

    path = os.path.join(d, "words", "tokenizer.json")
    tok = Tokenizer.from_file(path)
    res["words_tokenizers"] = [e.ids for e in tok.encode_batch(captions)]
    fast = PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<|startoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<|unk|>")
    enc = fast(captions, padding="max_length", max_length=n, truncation=True)
    res["words_fast"] = enc["input_ids"]
    res["words_fast_mask"] = enc["attention_mask"]

    vocab, merges = tiny_clip_bpe()
    for name, pad in [("eos", "<|endoftext|>"), ("bang", "!")]:
        t = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad)
        out = os.path.join(d, f"bpe_{name}")
        t.save_pretrained(out)
        enc = t(captions, padding="max_length", max_length=n, truncation=True)
        res[f"bpe_{name}"] = enc["input_ids"]
        res[f"bpe_{name}_pad_id"] = t.pad_token_id

    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1])
