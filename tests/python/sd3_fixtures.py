"""Fixtures for the SD3 parity tests: tiny random diffusers SD3Transformer2DModel folders,
their outputs on fixed inputs, a Python reference of SoftREPA's soft-token injection
(Algorithm 1) over the diffusers blocks, and FlowMatchEulerDiscreteScheduler schedules.

usage: sd3_fixtures.py OUT_DIR
"""
import json
import os
import sys

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors.torch import save_file

BASE = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,  # = heads * head_dim, as in the released models
    pooled_projection_dim=10,
    pos_embed_max_size=8,
)

CASES = {
    # name: (config overrides, latent (h, w))
    "plain": ({}, (8, 8)),
    "sd35_rms": (dict(num_layers=3, qk_norm="rms_norm"), (8, 8)),
    "dual": (dict(num_layers=3, qk_norm="rms_norm", dual_attention_layers=[0, 1]), (8, 8)),
    "nonsquare": (dict(num_layers=2, pos_embed_max_size=10, sample_size=12), (8, 12)),
    "sharded": (dict(num_layers=2), (8, 8)),
    # PixArt-style config: no persistent table, one computed for each latent grid.
    "no_max": (dict(num_layers=2, pos_embed_max_size=None), (8, 12)),
}

BATCH = 2
TEXT_LEN = 5
TIMESTEPS = torch.tensor([37.5, 912.0])  # different per sample


def randomise(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def inputs(cfg, hw, gen):
    h, w = hw
    return {
        "hidden_states": torch.randn(BATCH, cfg["in_channels"], h, w, generator=gen),
        "timestep": TIMESTEPS.clone(),
        "encoder_hidden_states": torch.randn(BATCH, TEXT_LEN, cfg["joint_attention_dim"], generator=gen),
        "pooled_projections": torch.randn(BATCH, cfg["pooled_projection_dim"], generator=gen),
    }


def injected_forward(model, inp, tokens, table, space, n_blocks):
    """SoftREPA Algorithm 1 over the diffusers modules: before block i < n_blocks the context
    is [tokens_i + time_i, last n text tokens]; later blocks see the n text tokens."""
    hidden = inp["hidden_states"]
    t = inp["timestep"]
    h, w = hidden.shape[-2:]
    x = model.pos_embed(hidden)
    temb = model.time_text_embed(t, inp["pooled_projections"])
    ctx = model.context_embedder(inp["encoder_hidden_states"])
    n = ctx.shape[1]
    jd = model.inner_dim
    rows = t.long().clamp(max=999) // 10
    for i, block in enumerate(model.transformer_blocks):
        if i < n_blocks:
            tok = tokens[i].unsqueeze(0).expand(hidden.shape[0], -1, -1)
            if space == "context":
                tok = model.context_embedder(tok)
            tok = tok + table[rows][:, i * jd:(i + 1) * jd].unsqueeze(1)
            c_in = torch.cat([tok, ctx], dim=1)
        else:
            c_in = ctx
        c_out, x = block(hidden_states=x, encoder_hidden_states=c_in, temb=temb)
        if c_out is not None:
            ctx = c_out[:, -n:]
    x = model.norm_out(x, temb)
    x = model.proj_out(x)
    p = model.config.patch_size
    x = x.reshape(x.shape[0], h // p, w // p, p, p, model.out_channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], model.out_channels, h, w)


def main(out):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    manifest = {}
    for name, (over, hw) in CASES.items():
        cfg = dict(BASE, **over)
        model = SD3Transformer2DModel(**cfg).eval()
        randomise(model, gen)
        d = os.path.join(out, name)
        kw = dict(max_shard_size="20KB") if name == "sharded" else {}
        model.save_pretrained(os.path.join(d, "model"), safe_serialization=True, **kw)
        inp = inputs(cfg, hw, gen)
        with torch.no_grad():
            sample = model(**inp, return_dict=False)[0]
        io = dict(inp, sample=sample)
        # The positional table diffusers computes at construction, for the preset path.
        io["pos_embed"] = model.pos_embed.pos_embed.clone()
        if name == "dual":
            n_tok, k = 3, 2
            table = torch.randn(100, k * model.inner_dim, generator=gen) * 0.5
            for space, dim in (("joint", model.inner_dim), ("context", cfg["joint_attention_dim"])):
                tokens = torch.randn(k, n_tok, dim, generator=gen) * 0.5
                with torch.no_grad():
                    ref = injected_forward(model, inp, tokens, table, space, k)
                io[f"inject_{space}.tokens"] = tokens
                io[f"inject_{space}.time_table"] = table
                io[f"inject_{space}.sample"] = ref
            manifest["inject"] = dict(case=name, tokens=n_tok, blocks=k, buckets=100)
        save_file({k: v.detach().clone().contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))
        manifest[name] = dict(config=cfg, latent=list(hw))
    sched = {}
    for steps, shift in ((28, 3.0), (50, 3.0), (4, 1.0), (1, 3.0), (10, 2.5)):
        s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        s.set_timesteps(steps)
        sched[f"{steps}_{shift}"] = dict(
            steps=steps,
            shift=shift,
            # fp32 bit patterns: JSON decimal floats need not round-trip exactly.
            timesteps=s.timesteps.to(torch.float32).view(torch.int32).tolist(),
            sigmas=s.sigmas.to(torch.float32).view(torch.int32).tolist(),
        )
    manifest["schedules"] = sched
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
