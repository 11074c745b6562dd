"""Fixtures for the CLIP text encoder parity tests: tiny random transformers CLIPTextModel /
CLIPTextModelWithProjection folders and their outputs (every hidden state, last_hidden_state,
pooled, text_embeds) on fixed, padded id batches.

usage: clip_fixtures.py OUT_DIR

OUT_DIR/<case>/model     the folder transformers' save_pretrained wrote
OUT_DIR/<case>/io.safetensors  inputs and reference outputs
OUT_DIR/<case>/prefixed  (plain CLIPTextModel cases) the same weights under `text_model.` names,
                         checked here to load in transformers 5 with nothing missing or unused
OUT_DIR/manifest.json    per case: class, config, whether an attention mask is passed
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

BASE = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=16,
    projection_dim=24,
)

# name: (class, config overrides, ids spec, pass attention_mask)
# ids spec: (bos, eos, pad, token range, per-row token counts)
CASES = {
    # eos_token_id == 2: transformers pools at argmax(ids); as in the released CLIP checkpoints
    # the real end token (99) is the largest id and padding repeats it.
    "legacy_quick_gelu": (
        "CLIPTextModel",
        dict(hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1),
        (98, 99, 99, (3, 98), [5, 14, 1]),
        False,
    ),
    # eos_token_id == 7: the first position holding 7; the tokens around it are larger, so the
    # legacy argmax rule would pick another position.
    "proj_gelu": (
        "CLIPTextModelWithProjection",
        dict(hidden_act="gelu", bos_token_id=6, eos_token_id=7, pad_token_id=7),
        (6, 7, 7, (8, 100), [3, 14, 9]),
        False,
    ),
    # Padding with a token other than EOS (SD 2.x pads with `!`) and an attention mask.
    "masked_tanh": (
        "CLIPTextModel",
        dict(hidden_act="gelu_pytorch_tanh", bos_token_id=6, eos_token_id=7, pad_token_id=1),
        (6, 7, 1, (8, 100), [2, 10, 14]),
        True,
    ),
    # Legacy pooling with a projection (SD3's CLIP-L: CLIPTextModelWithProjection, eos 2).
    "legacy_proj_short": (
        "CLIPTextModelWithProjection",
        dict(hidden_act="quick_gelu", num_hidden_layers=2, bos_token_id=0, eos_token_id=2,
             pad_token_id=1),
        (98, 99, 99, (3, 98), [4, 6]),
        False,
    ),
}
SEQ = 16


def randomise(model, gen):
    """Weights of order one: the default 0.02 init would make every output nearly equal and the
    comparison meaningless."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.3
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def make_ids(spec, gen):
    bos, eos, pad, (lo, hi), counts = spec
    rows, masks = [], []
    for n in counts:
        toks = torch.randint(lo, hi, (n,), generator=gen).tolist()
        row = [bos] + toks + [eos]
        row = row[:SEQ]
        mask = [1] * len(row) + [0] * (SEQ - len(row))
        row = row + [pad] * (SEQ - len(row))
        rows.append(row)
        masks.append(mask)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)


def outputs(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    res = {"last_hidden_state": out.last_hidden_state}
    for i, h in enumerate(out.hidden_states):
        res[f"hidden_states.{i}"] = h
    if hasattr(out, "text_embeds"):
        res["text_embeds"] = out.text_embeds
        # CLIPTextModelWithProjection does not return the pooled output; read it from the tower.
        with torch.no_grad():
            inner = model.text_model(input_ids=ids, attention_mask=mask)
        res["pooled"] = inner.pooler_output
    else:
        res["pooled"] = out.pooler_output
    return res


def check_prefixed_layout(model_dir, prefixed_dir, ids, mask, ref):
    """The `text_model.` layout save_pretrained writes must load in transformers 5 as a plain
    CLIPTextModel with nothing missing or unused, and give the same outputs."""
    os.makedirs(prefixed_dir, exist_ok=True)
    sd = load_file(os.path.join(model_dir, "model.safetensors"))
    save_file({f"text_model.{k}": v for k, v in sd.items()},
              os.path.join(prefixed_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = f.read()
    with open(os.path.join(prefixed_dir, "config.json"), "w") as f:
        f.write(cfg)
    m, info = CLIPTextModel.from_pretrained(prefixed_dir, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"prefixed layout does not load cleanly: {bad}"
    got = outputs(m.eval(), ids, mask)
    err = (got["last_hidden_state"] - ref["last_hidden_state"]).abs().max().item()
    assert err == 0.0, f"prefixed layout gives different outputs ({err})"


def main(out_dir):
    torch.manual_seed(0)
    manifest = {}
    for k, (name, (cls, over, spec, use_mask)) in enumerate(CASES.items()):
        gen = torch.Generator().manual_seed(1000 + k)
        cfg = CLIPTextConfig(**{**BASE, **over})
        klass = {"CLIPTextModel": CLIPTextModel,
                 "CLIPTextModelWithProjection": CLIPTextModelWithProjection}[cls]
        model = klass(cfg).eval()
        randomise(model, gen)
        ids, mask = make_ids(spec, gen)
        ref = outputs(model, ids, mask if use_mask else None)
        case_dir = os.path.join(out_dir, name)
        model_dir = os.path.join(case_dir, "model")
        model.save_pretrained(model_dir)
        io = {"input_ids": ids, "attention_mask": mask}
        io.update({k2: v.contiguous() for k2, v in ref.items()})
        save_file(io, os.path.join(case_dir, "io.safetensors"))
        if cls == "CLIPTextModel":
            check_prefixed_layout(model_dir, os.path.join(case_dir, "prefixed"), ids,
                                  mask if use_mask else None, ref)
        manifest[name] = dict(cls=cls, use_mask=use_mask, config=cfg.to_dict(),
                              keys=sorted(load_file(os.path.join(
                                  model_dir, "model.safetensors")).keys()))
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
