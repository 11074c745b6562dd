"""Fixtures for the `.bin` model-folder test in tests/unet.rs: tiny random model folders saved
twice, as safetensors and as torch pickles (what older diffusers / transformers folders and the
released DDPO pipelines ship), plus a pickle whose reduce calls os.system.

usage: bin_folders.py OUT_DIR

OUT_DIR/<kind>/safe/   config.json + the safetensors weights
OUT_DIR/<kind>/bin/    config.json + the pickled weights (diffusers: save_pretrained with
                       safe_serialization=False; transformers 5 no longer writes pickles, so
                       torch.save of the state dict, which is what transformers 4 wrote)
OUT_DIR/evil/          a UNet folder whose diffusion_pytorch_model.bin would run `true`
OUT_DIR/strict/        a UNet folder whose pickle lacks conv_out.bias and holds stray.weight
"""
import os
import shutil
import sys

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel


def randomise(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def diffusers_twins(out, kind, model, **bin_kw):
    model.save_pretrained(os.path.join(out, kind, "safe"), safe_serialization=True)
    model.save_pretrained(os.path.join(out, kind, "bin"), safe_serialization=False, **bin_kw)


def transformers_twins(out, kind, model, extra=None):
    model.save_pretrained(os.path.join(out, kind, "safe"))
    d = os.path.join(out, kind, "bin")
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(out, kind, "safe", "config.json"), d)
    state = dict(model.state_dict())
    state.update(extra or {})
    torch.save(state, os.path.join(d, "pytorch_model.bin"))


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def main(out):
    gen = torch.Generator().manual_seed(77)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=12,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=8,
    )
    randomise(unet, gen)
    diffusers_twins(out, "unet", unet)

    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                        layers_per_block=1, norm_num_groups=4, sample_size=16, latent_channels=4)
    randomise(vae, gen)
    diffusers_twins(out, "vae", vae)

    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4,
                                num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                joint_attention_dim=12, caption_projection_dim=16,
                                pooled_projection_dim=10, pos_embed_max_size=8)
    randomise(sd3, gen)
    # Sharded: diffusion_pytorch_model-0000k-of-0000n.bin + diffusion_pytorch_model.bin.index.json.
    diffusers_twins(out, "sd3", sd3, max_shard_size="20KB")

    clip = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=40, hidden_size=16, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=20, projection_dim=8,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    randomise(clip, gen)
    # transformers < 4.31 kept the position ids as a persistent buffer.
    transformers_twins(out, "clip", clip,
                       {"text_model.embeddings.position_ids": torch.arange(20).unsqueeze(0)})

    t5 = T5EncoderModel(T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20, dropout_rate=0.0,
                                 feed_forward_proj="gated-gelu"))
    randomise(t5, gen)
    transformers_twins(out, "t5", t5)

    evil = os.path.join(out, "evil")
    os.makedirs(evil, exist_ok=True)
    shutil.copy(os.path.join(out, "unet", "bin", "config.json"), evil)
    state = {k: v for k, v in unet.state_dict().items()}
    state["payload"] = Evil()
    torch.save(state, os.path.join(evil, "diffusion_pytorch_model.bin"))

    # A plain pickle that lacks `conv_out.bias` and holds a stray tensor.
    strict = os.path.join(out, "strict")
    os.makedirs(strict, exist_ok=True)
    shutil.copy(os.path.join(out, "unet", "bin", "config.json"), strict)
    state = {k: v for k, v in unet.state_dict().items() if k != "conv_out.bias"}
    state["stray.weight"] = torch.zeros(2)
    torch.save(state, os.path.join(strict, "diffusion_pytorch_model.bin"))


if __name__ == "__main__":
    main(sys.argv[1])
