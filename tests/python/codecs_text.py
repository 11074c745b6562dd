"""Fixtures for tests/codecs.rs, text side: tiny random transformers T5EncoderModel folders with
their outputs, and tiny tokenizers (a T5 Unigram tokenizer.json; a CLIP BPE folder holding only
vocab.json + merges.txt, as the SD 1.5 / SDXL / SD3 `tokenizer*` folders do) with the ids
transformers gives for tricky captions, called as diffusers calls them.

usage: codecs_text.py OUT_DIR

OUT_DIR/t5/<case>/model, OUT_DIR/t5/<case>/io.safetensors
OUT_DIR/t5_tok/            tokenizer.json + config files of a tiny T5Tokenizer
OUT_DIR/clip_bpe/          vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json
OUT_DIR/manifest.json      configs, captions and reference ids
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from tiny_bpe import bpe_vocab_merges
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5Tokenizer)

T5_BASE = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=20,
               dropout_rate=0.0)
T5_CASES = {
    # T5 v1.1 as SD3's text_encoder_3: gated-gelu (gelu_new). 24 tokens reach past
    # max_distance, so the clamped logarithmic buckets are exercised.
    "gated_gelu": dict(feed_forward_proj="gated-gelu"),
    # T5 v1.0: plain relu feed-forward (`wi`).
    "relu": dict(feed_forward_proj="relu", num_layers=2),
}
SEQ = 24

CAPTIONS = [
    "a photo of a red cube",
    "Two blue spheres, left of a green cube!!! (really?) -- yes; 100% sure.",
    "caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001F600 emoji",
    "",
    "   extra    spaces\tand\ttabs\nnewline   ",
    " ".join(["a red cube and a blue sphere"] * 20),
    "it's the cube's left, they're RED",
    "<|endoftext|> inside text",
]

T5_PIECES = ["\u2581a", "\u2581photo", "\u2581of", "\u2581red", "\u2581cube", "\u2581blue",
             "\u2581sphere", "s", "\u2581", "a", "b", "c", "d", "e", "f", "g", "h", "i", "l",
             "n", "o", "p", "r", "t", "u", "w", "y", ",", ".", "!", "?", "(", ")", "-", ";",
             "%", "1", "0", "'", "\u00e9", "\u2581two", "\u2581left", "\u2581green", "\u2581the"]

CLIP_WORDS = ["a", "photo", "of", "red", "blue", "green", "cube", "sphere", "two", "left",
              "and", "the", "it", "'s", "caf"]


def randomise(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.3
            if "layer_norm" in name:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def t5_cases(out, manifest):
    gen = torch.Generator().manual_seed(7)
    manifest["t5"] = {}
    for name, over in T5_CASES.items():
        cfg = T5Config(**{**T5_BASE, **over})
        model = T5EncoderModel(cfg).eval()
        randomise(model, gen)
        ids = torch.randint(0, cfg.vocab_size, (3, SEQ), generator=gen)
        mask = torch.ones(3, SEQ, dtype=torch.long)
        mask[1, 10:] = 0
        mask[2, 3:] = 0
        d = os.path.join(out, "t5", name)
        model.save_pretrained(os.path.join(d, "model"))
        io = {"input_ids": ids, "attention_mask": mask}
        with torch.no_grad():
            plain = model(input_ids=ids, output_hidden_states=True)
            masked = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        io["last_hidden_state"] = plain.last_hidden_state
        for i, h in enumerate(plain.hidden_states):
            io[f"hidden_states.{i}"] = h
        io["masked.last_hidden_state"] = masked.last_hidden_state
        with torch.no_grad():
            bf16 = T5EncoderModel(cfg).eval()
            bf16.load_state_dict(model.state_dict())
            io["bf16.last_hidden_state"] = bf16.to(torch.bfloat16)(input_ids=ids) \
                .last_hidden_state.float()
        save_file({k: v.clone().contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))
        manifest["t5"][name] = dict(num_layers=cfg.num_layers)


def clip_case(out, manifest):
    """An OpenCLIP-bigG-shaped tower in miniature (gelu, projection, legacy EOS pooling) for
    `softalign forward` on a CLIPTextModelWithProjection folder."""
    gen = torch.Generator().manual_seed(11)
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, projection_dim=24,
                         hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = CLIPTextModelWithProjection(cfg).eval()
    randomise(model, gen)
    ids = torch.randint(3, 98, (2, 16), generator=gen)
    ids[:, 0] = 98
    ids[0, 5:] = 99
    ids[1, 12:] = 99
    with torch.no_grad():
        o = model(input_ids=ids, output_hidden_states=True)
        pooled = model.text_model(input_ids=ids).pooler_output
    io = {"input_ids": ids, "last_hidden_state": o.last_hidden_state, "text_embeds": o.text_embeds,
          "pooler_output": pooled}
    for i, h in enumerate(o.hidden_states):
        io[f"hidden_states.{i}"] = h
    d = os.path.join(out, "clip_proj")
    model.save_pretrained(os.path.join(d, "model"))
    save_file({k: v.clone().contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))
    manifest["clip_proj_layers"] = cfg.num_hidden_layers


def clip_bpe_folder(d):
    vocab, merges = bpe_vocab_merges(CLIP_WORDS)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    # As SD 1.5's tokenizer folder (transformers 4.x wrote these).
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
                   "do_lower_case": True}, f)


def main(out):
    os.makedirs(out, exist_ok=True)
    manifest = {"captions": CAPTIONS}
    t5_cases(out, manifest)
    clip_case(out, manifest)

    # T5: a tiny Unigram vocabulary; NFKC stands in for the sentencepiece charsmap.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, -1.0 - 0.1 * i) for i, p in enumerate(T5_PIECES)]
    extra = 4
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra - 1, -1, -1)]
    t5 = T5Tokenizer(vocab=vocab, extra_ids=extra)
    from tokenizers import normalizers
    t5.backend_tokenizer.normalizer = normalizers.NFKC()
    t5_dir = os.path.join(out, "t5_tok")
    t5.save_pretrained(t5_dir)
    t5 = T5Tokenizer.from_pretrained(t5_dir)
    manifest["t5_ids"] = {}
    for n in (16, 256):
        enc = t5(CAPTIONS, padding="max_length", max_length=n, truncation=True,
                 add_special_tokens=True)
        manifest["t5_ids"][str(n)] = enc["input_ids"]
    manifest["t5_pad_id"] = t5.pad_token_id
    manifest["t5_eos_id"] = t5.eos_token_id

    clip_dir = os.path.join(out, "clip_bpe")
    clip_bpe_folder(clip_dir)
    clip = CLIPTokenizer.from_pretrained(clip_dir)
    enc = clip(CAPTIONS, padding="max_length", max_length=77, truncation=True)
    manifest["clip_ids"] = enc["input_ids"]
    manifest["clip_pad_id"] = clip.pad_token_id
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
