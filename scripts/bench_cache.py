"""Encode-throughput benchmark of `softalign cache` at SD1.5's real encoder sizes.

Builds, with random weights (nothing can be downloaded), an SD1.5-shaped diffusers folder whose
encoders have the released sizes: CLIP ViT-L/14 text tower (12 x 768, quick_gelu) and the SD
AutoencoderKL (128/256/512/512, 2 resnets per block, 4 latent channels); the UNet is tiny (the
cache never runs it). Then N random 512 px JPEGs, a manifest and a cache recipe. Usage:

    source scripts/env.sh
    $SOFTALIGN_PYTHON scripts/bench_cache.py /tmp/bench-cache 32
    target/release/softalign cache --recipe /tmp/bench-cache/cache.toml --batch 4

`softalign cache` prints samples/s and bytes per sample.
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
from pipelines_fixtures import clip_tokenizer, ddim  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402


def main(out, n):
    torch.manual_seed(0)
    tok = clip_tokenizer("<|endoftext|>")
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12,
                                      max_position_embeddings=77, hidden_act="quick_gelu",
                                      projection_dim=768, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)).eval()
    # runwayml/stable-diffusion-v1-5 vae/config.json
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                        latent_channels=4, sample_size=512, scaling_factor=0.18215).eval()
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4,
                                block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                layers_per_block=1, cross_attention_dim=768,
                                attention_head_dim=8, norm_num_groups=8).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=ddim(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(os.path.join(out, "sd15-encoders"))
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(os.path.join(data, "train.jsonl"), "w") as f:
        for i in range(n):
            # COCO-like sizes: 640 x 480, resized and cropped to 512 by the loader.
            img = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
            Image.fromarray(img).save(os.path.join(data, f"{i}.jpg"), quality=90)
            caps = [f"a photo of a red cube number {i} and {k}" for k in range(5)]
            f.write(json.dumps({"image": f"{i}.jpg", "captions": caps}) + "\n")
    with open(os.path.join(out, "cache.toml"), "w") as f:
        f.write(f"""name = "bench-cache"
[backbone]
type = "unet"
path = "sd15-encoders"

[[adapter]]
type = "soft_tokens"
tokens = 4
sites = ["down"]

[[objective]]
type = "softrepa_contrastive"
weight = 1.0

[data]
type = "encoded_cache"
path = "cache"
source = {{ type = "image_manifest", path = "data/train.jsonl", resolution = 512 }}

[train]
steps = 1
lr = 1e-3
""")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32)
