"""Loads the LoRA file softalign wrote (DIR/pytorch_lora_weights.safetensors) the way
`StableDiffusion3Pipeline.load_lora_weights` does (lora_state_dict, then
load_lora_into_transformer with the header's metadata) into DIR/model, and writes the
transformer's output on DIR/io.safetensors to DIR/py_out.safetensors.

usage: lora_load_check.py DIR
"""
import os
import sys

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file

d = sys.argv[1]
model = SD3Transformer2DModel.from_pretrained(os.path.join(d, "model")).eval()
sd, meta = StableDiffusion3Pipeline.lora_state_dict(d, return_lora_metadata=True)
assert meta is not None, "the header's lora_adapter_metadata was not read"
StableDiffusion3Pipeline.load_lora_into_transformer(sd, transformer=model, metadata=meta)
io = load_file(os.path.join(d, "io.safetensors"))
with torch.no_grad():
    out = model(
        hidden_states=io["hidden_states"],
        timestep=io["timestep"],
        encoder_hidden_states=io["encoder_hidden_states"],
        pooled_projections=io["pooled_projections"],
    ).sample
save_file({"sample": out}, os.path.join(d, "py_out.safetensors"))
