"""Reference for `softalign edit` (tests/pipelines.rs): FlowEdit's loop written from the
algorithm (FlowEdit_utils.py FlowEditSD3, with the standard CFG formula u + s (c - u) in both
branches and the n_min tail using the target velocity it computes), on a diffusers SD3
pipeline folder, with or without soft tokens injected as SoftREPA's Algorithm 1 (the same
injection as sd3_fixtures.py) in all four branches.

usage: flowedit_reference.py DIR

DIR/cases.json: {"model": folder, "image": png, "source": str, "target": str,
                 "cases": {name: {steps, n_max, n_min, n_avg, src_guidance, tar_guidance,
                                  seed, adapter (file or null)}}}
DIR/reference.safetensors: <name>.x_src, <name>.edited (batch of one)

Noise: draw d of edit 0 is torch.randn after torch.manual_seed(micro_seed(seed ^ EDIT_DOMAIN,
0, d)), d = step * n_avg + k while editing and step * n_avg at the tail's start
(src/cli/edit_loop.rs).
"""
import json
import os
import sys

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import load_file, save_file

M64 = (1 << 64) - 1
EDIT_DOMAIN = 0xED17_F10E_0000_0000


def splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def micro_seed(run_seed, step, micro):
    return splitmix64(splitmix64(splitmix64(run_seed) ^ step) ^ micro)


def noise(seed, draw, shape):
    torch.manual_seed(micro_seed(seed ^ EDIT_DOMAIN, 0, draw))
    return torch.randn(shape)


def forward(model, x, t, ehs, pooled, tokens):
    """The transformer, with soft tokens (joint space) prepended to the context of the first
    blocks when `tokens` = (tokens [k, n, D], time table [100, k * D]) is given."""
    if tokens is None:
        return model(hidden_states=x, timestep=t, encoder_hidden_states=ehs,
                     pooled_projections=pooled, return_dict=False)[0]
    tok_all, table = tokens
    k = tok_all.shape[0]
    h, w = x.shape[-2:]
    hidden = model.pos_embed(x)
    temb = model.time_text_embed(t, pooled)
    ctx = model.context_embedder(ehs)
    n = ctx.shape[1]
    jd = model.inner_dim
    rows = t.long().clamp(max=999) // 10
    for i, block in enumerate(model.transformer_blocks):
        if i < k:
            tok = tok_all[i].unsqueeze(0).expand(x.shape[0], -1, -1)
            tok = tok + table[rows][:, i * jd:(i + 1) * jd].unsqueeze(1)
            c_in = torch.cat([tok, ctx], dim=1)
        else:
            c_in = ctx
        c_out, hidden = block(hidden_states=hidden, encoder_hidden_states=c_in, temb=temb)
        if c_out is not None:
            ctx = c_out[:, -n:]
    hidden = model.norm_out(hidden, temb)
    hidden = model.proj_out(hidden)
    p = model.config.patch_size
    hidden = hidden.reshape(hidden.shape[0], h // p, w // p, p, p, model.out_channels)
    hidden = torch.einsum("nhwpqc->nchpwq", hidden)
    return hidden.reshape(hidden.shape[0], model.out_channels, h, w)


def flowedit(pipe, x_src, src, tar, c, tokens):
    """src / tar: (embeds, pooled, negative embeds, negative pooled)."""
    sched = pipe.scheduler
    sched.set_timesteps(c["steps"])
    timesteps = sched.timesteps
    T = len(timesteps)
    ehs = torch.cat([src[2], src[0], tar[2], tar[0]])
    pooled = torch.cat([src[3], src[1], tar[3], tar[1]])
    z_edit = x_src.clone()
    x_tar = None
    for i, t in enumerate(timesteps):
        if T - i > c["n_max"]:
            continue
        t_i = t / 1000
        t_im1 = timesteps[i + 1] / 1000 if i + 1 < T else torch.zeros_like(t_i)
        if T - i > c["n_min"]:
            v_delta = torch.zeros_like(x_src)
            for k in range(c["n_avg"]):
                eps = noise(c["seed"], i * c["n_avg"] + k, x_src.shape)
                z_src = (1 - t_i) * x_src + t_i * eps
                z_tar = z_edit + z_src - x_src
                v = forward(pipe.transformer, torch.cat([z_src, z_src, z_tar, z_tar]),
                            t.expand(4), ehs, pooled, tokens)
                su, sc, tu, tc = v.chunk(4)
                v_src = su + c["src_guidance"] * (sc - su)
                v_tar = tu + c["tar_guidance"] * (tc - tu)
                v_delta += (v_tar - v_src) / c["n_avg"]
            z_edit = z_edit + (t_im1 - t_i) * v_delta
        else:
            if i == T - c["n_min"]:
                eps = noise(c["seed"], i * c["n_avg"], x_src.shape)
                x_tar = z_edit + ((1 - t_i) * x_src + t_i * eps) - x_src
            v = forward(pipe.transformer, torch.cat([x_tar, x_tar]), t.expand(2),
                        torch.cat([tar[2], tar[0]]), torch.cat([tar[3], tar[1]]), tokens)
            tu, tc = v.chunk(2)
            x_tar = x_tar + (t_im1 - t_i) * (tu + c["tar_guidance"] * (tc - tu))
    return z_edit if c["n_min"] == 0 else x_tar


def main(d):
    with open(os.path.join(d, "cases.json")) as f:
        spec = json.load(f)
    pipe = StableDiffusion3Pipeline.from_pretrained(spec["model"]).to("cpu")
    img = np.array(Image.open(spec["image"]).convert("RGB"))
    img = torch.from_numpy(img).permute(2, 0, 1).float().unsqueeze(0) / 127.5 - 1
    out = {}
    with torch.no_grad():
        vae = pipe.vae
        x_src = vae.encode(img).latent_dist.mode()
        x_src = (x_src - vae.config.shift_factor) * vae.config.scaling_factor

        def enc(p):
            pe, ne, pp, npp = pipe.encode_prompt(
                prompt=p, prompt_2=None, prompt_3=None, negative_prompt="",
                do_classifier_free_guidance=True, device="cpu", max_sequence_length=256)
            return pe, pp, ne, npp
        src, tar = enc(spec["source"]), enc(spec["target"])
        for name, c in spec["cases"].items():
            tokens = None
            if c["adapter"]:
                a = load_file(c["adapter"])
                tokens = (a["default.tokens"], a["time_table"])
            out[f"{name}.x_src"] = x_src
            out[f"{name}.edited"] = flowedit(pipe, x_src, src, tar, c, tokens)
    save_file({k: v.detach().float().clone().contiguous() for k, v in out.items()},
              os.path.join(d, "reference.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
