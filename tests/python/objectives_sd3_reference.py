"""Tiny SD3 (diffusers SD3Transformer2DModel, random config) and the bare-backbone objectives
computed pair by pair, for `softalign loss --no-adapter`.

usage: objectives_sd3_reference.py OUT   -> OUT/tiny_sd3/, OUT/batch.safetensors, OUT/expected.json
"""
import json
import sys

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(0)
model = SD3Transformer2DModel(
    sample_size=8, patch_size=2, in_channels=4, num_layers=5, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
    pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
).eval()
model.save_pretrained(f"{out}/tiny_sd3")

b, t = 3, 420
g = torch.Generator().manual_seed(5)
x0 = torch.randn(b, 4, 8, 8, generator=g) * 0.5
noise = torch.randn(4, 8, 8, generator=g)
ehs = torch.randn(b, 6, 12, generator=g)
pooled = torch.randn(b, 8, generator=g)
save_file({"x0": x0, "noise": noise, "timestep": torch.tensor([t]), "encoder_hidden_states": ehs,
           "pooled_projections": pooled}, f"{out}/batch.safetensors")

sigma = t / 1000.0
target = noise - x0
with torch.no_grad():
    pred = torch.zeros(b, b, 4, 8, 8)
    for i in range(b):
        x_t = (1 - sigma) * x0[i] + sigma * noise
        for j in range(b):
            pred[i, j] = model(hidden_states=x_t[None], timestep=torch.tensor([float(t)]),
                               encoder_hidden_states=ehs[j:j + 1], pooled_projections=pooled[j:j + 1]).sample[0]
err = torch.stack([torch.stack([((target[i] - pred[i, j]) ** 2).mean() for j in range(b)]) for i in range(b)])
logits = 2.0 * torch.exp(-err / 0.5)
contrastive = torch.nn.functional.cross_entropy(logits, torch.arange(b))
dsm = torch.stack([err[i, i] for i in range(b)]).mean()
# AGSM bare: the EMA predictions are the online ones.
w = torch.softmax(-err / 0.1, 1)
gd = pred - torch.einsum("ik,ikchw->ichw", w, pred)[:, None]
pos = torch.stack([((pred[i, i] - (target[i] + gd[i, i])) ** 2).mean() for i in range(b)]).mean()
neg = torch.stack([((pred[i, j] - (target[i] - 0.1 * gd[i, j])) ** 2).mean()
                   for i in range(b) for j in range(b) if i != j]).mean()
terms = {"softrepa_contrastive": contrastive.item(), "dsm": dsm.item(), "agsm": (pos + neg).item(),
         "agsm/positive": pos.item(), "agsm/negative": neg.item()}
terms["total"] = terms["softrepa_contrastive"] + 10.0 * terms["dsm"] + terms["agsm"]
json.dump(terms, open(f"{out}/expected.json", "w"), indent=1)
