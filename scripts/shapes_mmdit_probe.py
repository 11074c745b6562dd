"""Probes of a shapes-world MMDiT folder (diffusers SD3Transformer2DModel + transformers CLIP
text tower): does the model know the four shapes, and does the prompt's shape word reach
the image? Run with the test venv's Python (diffusers, transformers, tokenizers):

    python scripts/shapes_mmdit_probe.py assets/shapes-mmdit out.png

Prints how far apart the text tower puts prompts that differ in the shape word and in the
colour word (norm of the difference of last hidden states), and writes a PNG of three blocks:
  1. x0 restored from a noised shape (red circle, square, triangle, diamond, 12 px, centred) at
     sigma 0.2 / 0.4 / 0.6 / 0.8 / 0.9 with the shape's own prompt (noisy input, then x0);
  2. SDEdit: a noised circle (rows 1-3) and triangle (rows 4-6) at sigma 0.5 / 0.7 / 0.9,
     denoised (Euler, CFG 4 against the empty prompt) with the prompts "a photo of a red
     circle / square / triangle / diamond" (two noise seeds each): if the shape word reached
     the image, the columns would differ;
  3. samples from pure noise (20 Euler steps, CFG 4), six seeds per shape prompt.
The renderer is the world's (worlds/src/shapes/render.rs: 8 x 8 supersampling, white canvas).
"""
import sys

import numpy as np
import torch
from diffusers import SD3Transformer2DModel
from PIL import Image
from tokenizers import Tokenizer
from transformers import CLIPTextModelWithProjection

torch.set_num_threads(1)
M, OUT = sys.argv[1], sys.argv[2]
tok = Tokenizer.from_file(f"{M}/tokenizer/tokenizer.json")
te = CLIPTextModelWithProjection.from_pretrained(f"{M}/text_encoder").eval()
tr = SD3Transformer2DModel.from_pretrained(f"{M}/transformer").eval()
SHAPES = ["circle", "square", "triangle", "diamond"]
RED = (220, 30, 30)


def enc(prompt):
    o = te(torch.tensor([tok.encode(prompt).ids]))
    return o.last_hidden_state, o.text_embeds


def contains(s, u, v):
    if s == "circle":
        return u * u + v * v <= 1
    if s == "square":
        return (abs(u) <= 1) & (abs(v) <= 1)
    if s == "triangle":
        return (v >= -1) & (v <= 1) & (abs(u) <= (v + 1) / 2)
    return abs(u) + abs(v) <= 1


def render(shape, cx=16, cy=16, size=12, ss=8):
    n = 32 * ss
    y, x = np.mgrid[0:n, 0:n]
    x, y = (x + 0.5) / ss, (y + 0.5) / ss
    cover = contains(shape, (x - cx) / (size / 2), (y - cy) / (size / 2)).astype(np.float32)
    cover = cover.reshape(32, ss, 32, ss).mean((1, 3))[..., None]
    img = 255.0 * (1 - cover) + np.array(RED, np.float32) * cover
    return torch.tensor(np.round(img) / 127.5 - 1).permute(2, 0, 1)[None].float()


def velocity(x, sigma, cond, uncond=None, cfg=1.0):
    t = torch.tensor([sigma * 1000.0])
    vc = tr(hidden_states=x, encoder_hidden_states=cond[0], pooled_projections=cond[1], timestep=t).sample
    if uncond is None:
        return vc
    vu = tr(hidden_states=x, encoder_hidden_states=uncond[0], pooled_projections=uncond[1], timestep=t).sample
    return vu + cfg * (vc - vu)


def euler(x, s0, cond, uncond, steps, cfg=4.0):
    ts = torch.linspace(s0, 0, steps + 1)
    for i in range(steps):
        x = x + (ts[i + 1] - ts[i]) * velocity(x, float(ts[i]), cond, uncond, cfg)
    return x


with torch.no_grad():
    h = {p: enc(p)[0][0] for p in ["a photo of a red circle", "a photo of a red diamond", "a photo of a blue circle"]}
    d_shape = (h["a photo of a red circle"] - h["a photo of a red diamond"]).norm().item()
    d_color = (h["a photo of a red circle"] - h["a photo of a blue circle"]).norm().item()
    print(f"text tower: |red circle - red diamond| = {d_shape:.2f}, |red circle - blue circle| = {d_color:.2f}, "
          f"|red circle| = {h['a photo of a red circle'].norm().item():.2f}")
    empty = enc("")
    blocks = []
    rows = []
    for s in SHAPES:
        cond, x0 = enc(f"a photo of a red {s}"), render(s)
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        row = [x0]
        for sg in [0.2, 0.4, 0.6, 0.8, 0.9]:
            xt = (1 - sg) * x0 + sg * eps
            row += [xt, xt - sg * velocity(xt, sg, cond)]
        rows.append(torch.cat(row, 3))
    blocks.append(torch.cat(rows, 2))
    rows = []
    for src in ["circle", "triangle"]:
        x0 = render(src)
        for s0 in [0.5, 0.7, 0.9]:
            row = []
            for tgt in SHAPES:
                cond = enc(f"a photo of a red {tgt}")
                for seed in range(2):
                    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
                    row.append(euler((1 - s0) * x0 + s0 * eps, s0, cond, empty, 14))
            rows.append(torch.cat(row, 3))
    blocks.append(torch.cat(rows, 2))
    rows = []
    for s in SHAPES:
        cond = enc(f"a photo of a red {s}")
        outs = [euler(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(k)), 1.0, cond, empty, 20)
                for k in range(6)]
        rows.append(torch.cat(outs, 3))
    blocks.append(torch.cat(rows, 2))

width = max(b.shape[3] for b in blocks)
pad = [torch.nn.functional.pad(b, (0, width - b.shape[3], 0, 4), value=0.0) for b in blocks]
img = torch.cat(pad, 2)[0].permute(1, 2, 0).clamp(-1, 1)
img = ((img + 1) * 127.5).round().byte().numpy()
Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(OUT)
print("wrote", OUT)
