"""Fixtures for the UNet tests: tiny random diffusers UNet2DConditionModel folders (SD1.5-like,
SDXL-like, SD2-like v-prediction pipeline, a second "Diffusion-DPO" UNet for the folder swap),
their outputs on fixed inputs with a different timestep per sample, a reference of SoftREPA's
token insertion after BOS per block group (forward pre-hooks that rewrite the
encoder_hidden_states each block group receives), DDIMScheduler timesteps and step outputs,
DDPM add_noise / get_velocity, DiffusionDPO's loss (train.py) with soft tokens as the
policy and the bare UNet as the reference, and DDPO's per-step DDIM log-probabilities.

usage: unet_fixtures.py OUT_DIR
"""
import json
import math
import os
import sys

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

CROSS = 24
BATCH = 3
TEXT_LEN = 6
TIMESTEPS = torch.tensor([0.0, 421.0, 999.0])  # different per sample

SD15 = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=CROSS,
    attention_head_dim=4,
    norm_num_groups=8,
)
SDXL = dict(
    sample_size=16,
    block_out_channels=(32, 32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 8),
    cross_attention_dim=CROSS,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=10 + 6 * 8,
    norm_num_groups=8,
)
SD2 = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=CROSS,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=8,
)
POOLED = 10


def randomise(model, gen):
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def inputs(cfg, hw, gen):
    h, w = hw
    inp = {
        "sample": torch.randn(BATCH, 4, h, w, generator=gen),
        "timestep": TIMESTEPS.clone(),
        "encoder_hidden_states": torch.randn(BATCH, TEXT_LEN, CROSS, generator=gen),
    }
    if cfg.get("addition_embed_type") == "text_time":
        inp["text_embeds"] = torch.randn(BATCH, POOLED, generator=gen)
        inp["time_ids"] = torch.tensor(
            [[128.0, 128.0, 0.0, 0.0, 128.0, 128.0], [96.0, 64.0, 8.0, 4.0, 128.0, 128.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]
        )
    return inp


def run(model, inp, contexts=None):
    """The diffusers forward; `contexts` maps a block group to the encoder_hidden_states its
    blocks receive instead of the model's input."""
    handles = []
    if contexts:
        def hook_for(ctx):
            def hook(_module, args, kwargs):
                kwargs = dict(kwargs)
                kwargs["encoder_hidden_states"] = ctx
                return args, kwargs
            return hook

        groups = {"down": list(model.down_blocks), "mid": [model.mid_block], "up": list(model.up_blocks)}
        for g, ctx in contexts.items():
            for m in groups[g]:
                handles.append(m.register_forward_pre_hook(hook_for(ctx), with_kwargs=True))
    kw = {}
    if "text_embeds" in inp:
        kw["added_cond_kwargs"] = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}
    try:
        with torch.no_grad():
            return model(inp["sample"], inp["timestep"], inp["encoder_hidden_states"], return_dict=False, **kw)[0]
    finally:
        for h in handles:
            h.remove()


def after_bos(ehs, tokens):
    return torch.cat([ehs[:, :1], tokens, ehs[:, 1:]], dim=1)


def injected(model, inp, tokens, table, groups):
    """SoftREPA's UNet injection: at each active group the context is [BOS, tokens + time row,
    rest]; tokens (len(groups), n, D); table (100, D) shared by all groups, or None."""
    b = inp["sample"].shape[0]
    ctxs = {}
    for k, g in enumerate(groups):
        tok = tokens[k].unsqueeze(0).expand(b, -1, -1)
        if table is not None:
            rows = inp["timestep"].long().clamp(max=999) // 10
            tok = tok + table[rows].unsqueeze(1)
        ctxs[g] = after_bos(inp["encoder_hidden_states"], tok)
    return run(model, inp, ctxs)


def save(d, tensors):
    os.makedirs(d, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, os.path.join(d, "io.safetensors"))


def main(out):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4321)
    manifest = {"cases": {}}

    models = {}
    for name, cfg, folder in (
        ("sd15", SD15, "sd15/model"),
        ("sdxl", SDXL, "sdxl/model"),
        ("sd2_vpred", SD2, "sd2_vpred/pipeline/unet"),
        ("dpo", SD15, "dpo/unet"),
    ):
        model = UNet2DConditionModel(**cfg).eval()
        randomise(model, gen)
        model.save_pretrained(os.path.join(out, folder), safe_serialization=True)
        models[name] = model
        # The v-prediction case is loaded as a pipeline folder (unet/ + scheduler/).
        manifest["cases"][name] = dict(folder=folder.removesuffix("/unet") if name == "sd2_vpred" else folder)

    # v-prediction pipeline: its scheduler config carries the prediction type.
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
    )
    sched.save_pretrained(os.path.join(out, "sd2_vpred/pipeline/scheduler"))

    # Forward parity, timesteps different per sample.
    for name, cfg, hw in (("sd15", SD15, (16, 16)), ("sdxl", SDXL, (16, 16)), ("sd2_vpred", SD2, (16, 16)), ("dpo", SD15, (16, 16))):
        inp = inputs(cfg, hw, gen)
        save(os.path.join(out, name), dict(inp, out=run(models[name], inp)))
    # A latent whose side is not a multiple of the down-sampling factor (upsample_size path).
    inp = inputs(SD15, (14, 10), gen)
    save(os.path.join(out, "sd15_odd"), dict(inp, out=run(models["sd15"], inp)))
    manifest["cases"]["sd15_odd"] = dict(folder="sd15/model")

    # Token insertion after BOS: SD1.5-like in [down] without a time table; SDXL-like in
    # [down, mid] with a shared time table; the swapped UNet with the SD1.5 tokens.
    n_tok = 3
    inject = {}
    for case, model_name, groups, with_table in (
        ("inject_sd15", "sd15", ["down"], False),
        ("inject_sdxl", "sdxl", ["down", "mid"], True),
    ):
        io = dict((k, v) for k, v in _load(out, model_name).items() if k != "out")
        tokens = torch.randn(len(groups), n_tok, CROSS, generator=gen) * 0.7
        table = torch.randn(100, CROSS, generator=gen) * 0.5 if with_table else None
        io["tokens"] = tokens
        if table is not None:
            io["time_table"] = table
        io["out"] = injected(models[model_name], io, tokens, table, groups)
        io["plain"] = run(models[model_name], io)
        save(os.path.join(out, case), io)
        inject[case] = dict(model=model_name, groups=groups, tokens=n_tok, time_table=with_table)
        if case == "inject_sd15":
            swap = dict(io)
            swap["out"] = injected(models["dpo"], io, tokens, None, groups)
            swap["plain"] = run(models["dpo"], io)
            save(os.path.join(out, "inject_dpo"), swap)
    manifest["inject"] = inject

    # DDIM: timesteps and step outputs on fixed inputs.
    ddim = {}
    g2 = torch.Generator().manual_seed(99)
    shape = (2, 4, 5, 5)
    io = {}
    configs = [
        dict(steps=30, spacing="leading", offset=1, alpha_one=False, eta=0.0, pred="epsilon", clip=False),
        dict(steps=50, spacing="leading", offset=1, alpha_one=False, eta=1.0, pred="epsilon", clip=False),
        dict(steps=7, spacing="trailing", offset=0, alpha_one=True, eta=0.5, pred="v_prediction", clip=False),
        dict(steps=30, spacing="trailing", offset=0, alpha_one=False, eta=0.0, pred="epsilon", clip=False),
        dict(steps=11, spacing="linspace", offset=0, alpha_one=True, eta=0.0, pred="v_prediction", clip=False),
        dict(steps=4, spacing="leading", offset=0, alpha_one=True, eta=0.3, pred="epsilon", clip=True),
        dict(steps=1000, spacing="leading", offset=0, alpha_one=False, eta=0.0, pred="epsilon", clip=False),
        # Zero terminal SNR: the first trailing step is t = 999, where abar = 0.
        dict(steps=10, spacing="trailing", offset=0, alpha_one=False, eta=0.0, pred="v_prediction", clip=False, zsnr=True),
        dict(steps=6, spacing="trailing", offset=0, alpha_one=False, eta=0.7, pred="v_prediction", clip=True, zsnr=True),
    ]
    for k, c in enumerate(configs):
        s = DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=c["clip"],
            set_alpha_to_one=c["alpha_one"], steps_offset=c["offset"], prediction_type=c["pred"],
            timestep_spacing=c["spacing"], rescale_betas_zero_snr=c.get("zsnr", False),
        )
        s.set_timesteps(c["steps"])
        ts = s.timesteps.tolist()
        picks = sorted(set([0, len(ts) // 2, len(ts) - 1]))
        for i in picks:
            t = ts[i]
            mo = torch.randn(shape, generator=g2)
            x = torch.randn(shape, generator=g2) * 2.0
            noise = torch.randn(shape, generator=g2)
            r = s.step(mo, t, x, eta=c["eta"], variance_noise=noise if c["eta"] > 0 else None)
            key = f"{k}_{i}"
            io[f"{key}.model_output"] = mo
            io[f"{key}.sample"] = x
            io[f"{key}.noise"] = noise
            io[f"{key}.prev_sample"] = r.prev_sample
            io[f"{key}.pred_original_sample"] = r.pred_original_sample
        ddim[str(k)] = dict(c, timesteps=ts, picks=picks)
    # DDPM training noise: add_noise and the v target at per-sample timesteps.
    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x0 = torch.randn(4, 4, 5, 5, generator=g2)
    eps = torch.randn(4, 4, 5, 5, generator=g2)
    t = torch.tensor([0, 1, 500, 999])
    io["ddpm.x0"] = x0
    io["ddpm.eps"] = eps
    io["ddpm.t"] = t.float()
    io["ddpm.noisy"] = ddpm.add_noise(x0, eps, t)
    io["ddpm.velocity"] = ddpm.get_velocity(x0, eps, t)
    io["ddpm.alphas_cumprod"] = ddpm.alphas_cumprod
    zsnr = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         rescale_betas_zero_snr=True, prediction_type="v_prediction")
    io["ddpm_zsnr.alphas_cumprod"] = zsnr.alphas_cumprod
    io["ddpm_zsnr.noisy"] = zsnr.add_noise(x0, eps, t)
    io["ddpm_zsnr.velocity"] = zsnr.get_velocity(x0, eps, t)
    save(os.path.join(out, "schedulers"), io)
    manifest["ddim"] = ddim
    manifest["dpo"] = diffusion_dpo_reference(out, models["sd15"])
    manifest["ddim_log_prob"] = ddim_log_prob_reference(out)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def tokens_forward(model, inp, tokens):
    """`injected` for the SD1.5-like case (tokens after BOS in the down group, no time table),
    keeping the graph so the gradient reaches the tokens."""
    b = inp["sample"].shape[0]
    ctx = after_bos(inp["encoder_hidden_states"], tokens[0].unsqueeze(0).expand(b, -1, -1))

    def hook(_module, args, kwargs):
        kwargs = dict(kwargs)
        kwargs["encoder_hidden_states"] = ctx
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.down_blocks]
    try:
        return model(inp["sample"], inp["timestep"], inp["encoder_hidden_states"], return_dict=False)[0]
    finally:
        for h in handles:
            h.remove()


def diffusion_dpo_reference(out, model):
    """DiffusionDPO train.py's loss (lines 1014-1145) on the SD1.5-like UNet: two pairs, winner
    and loser sharing t and noise (drawn for the first half and repeated), the policy = the
    UNet with soft tokens, the reference = the same UNet without them; and the --sft loss."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(2023)
    n = 2
    x0 = torch.randn(2 * n, 4, 8, 8, generator=g)
    noise = torch.randn(n, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)
    timesteps = torch.tensor([120, 730]).repeat(2)
    ehs = torch.randn(n, TEXT_LEN, CROSS, generator=g).repeat(2, 1, 1)
    tokens = (torch.randn(1, 3, CROSS, generator=g) * 0.7).requires_grad_(True)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    noisy = sched.add_noise(x0, noise, timesteps)
    target = noise  # epsilon prediction
    inp = {"sample": noisy, "timestep": timesteps.float(), "encoder_hidden_states": ehs}

    model_pred = tokens_forward(model, inp, tokens)
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_pred = model(noisy, timesteps.float(), ehs, return_dict=False)[0].detach()
        ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
        raw_ref_loss = ref_losses.mean()
    # beta so that the logits are of order one here (5000 saturates on a random tiny UNet).
    beta = float(1.5 / (model_diff - ref_diff).detach().abs().max())
    scale_term = -0.5 * beta
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    loss = -1 * F.logsigmoid(inside_term).mean()
    (grad,) = torch.autograd.grad(loss, tokens)
    sft = F.mse_loss(model_pred[:n].float(), target[:n].float(), reduction="mean")

    save(os.path.join(out, "dpo_loss"), dict(
        x0=x0, noise=noise, timestep=timesteps.float(), encoder_hidden_states=ehs,
        tokens=tokens.detach(), tokens_grad=grad, inside=inside_term.detach(),
    ))
    return dict(beta=beta, loss=loss.item(), implicit_acc=implicit_acc.item(),
                model_mse=raw_model_loss.item(), ref_mse=raw_ref_loss.item(), sft=sft.item())


def ddpo_step_with_logprob(sched, model_output, timestep, sample, eta, prev_sample=None, noise=None):
    """ddpo-pytorch's `ddim_step_with_logprob` (diffusers_patch/ddim_with_logprob.py): batched
    timesteps, the previous timestep clamped to [0, N - 1], log N(prev; mean, std^2) averaged
    over every non-batch dimension."""
    cfg = sched.config
    prev_timestep = timestep - cfg.num_train_timesteps // sched.num_inference_steps
    prev_timestep = torch.clamp(prev_timestep, 0, cfg.num_train_timesteps - 1)
    col = lambda v: v.reshape(v.shape + (1,) * (sample.ndim - 1)).broadcast_to(sample.shape)
    alpha_prod_t = sched.alphas_cumprod.gather(0, timestep)
    alpha_prod_t_prev = torch.where(prev_timestep >= 0, sched.alphas_cumprod.gather(0, prev_timestep),
                                    sched.final_alpha_cumprod)
    variance = ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)
    alpha_prod_t, alpha_prod_t_prev = col(alpha_prod_t), col(alpha_prod_t_prev)
    beta_prod_t = 1 - alpha_prod_t
    if cfg.prediction_type == "epsilon":
        x0 = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
        eps = model_output
    else:
        x0 = alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * model_output
        eps = alpha_prod_t ** 0.5 * model_output + beta_prod_t ** 0.5 * sample
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    std = col(eta * variance ** 0.5)
    mean = alpha_prod_t_prev ** 0.5 * x0 + (1 - alpha_prod_t_prev - std ** 2) ** 0.5 * eps
    if prev_sample is None:
        prev_sample = mean + std * noise
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * std ** 2) - torch.log(std)
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean


def ddim_log_prob_reference(out):
    """DDPO's per-step log-probabilities on fixed inputs: eta 1 and 0.4, per-sample timesteps
    that include the last step (where the clamp matters with set_alpha_to_one), epsilon and
    v-prediction, with clip_sample; scored on a given prev_sample and on one drawn from noise."""
    g = torch.Generator().manual_seed(5)
    configs = [
        dict(steps=50, offset=1, alpha_one=False, eta=1.0, pred="epsilon", clip=False, t=[981, 501, 1]),
        dict(steps=20, offset=0, alpha_one=True, eta=1.0, pred="epsilon", clip=False, t=[1, 50, 950]),
        dict(steps=10, offset=1, alpha_one=False, eta=0.4, pred="v_prediction", clip=True, t=[901, 1, 401]),
    ]
    io = {}
    for k, c in enumerate(configs):
        sched = DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=c["clip"],
            set_alpha_to_one=c["alpha_one"], steps_offset=c["offset"], prediction_type=c["pred"],
        )
        sched.set_timesteps(c["steps"])
        shape = (3, 4, 5, 5)
        mo = torch.randn(shape, generator=g)
        x = torch.randn(shape, generator=g) * 1.5
        given = torch.randn(shape, generator=g)
        noise = torch.randn(shape, generator=g)
        t = torch.tensor(c["t"])
        _, lp_given, mean = ddpo_step_with_logprob(sched, mo, t, x, c["eta"], prev_sample=given)
        drawn, lp_drawn, _ = ddpo_step_with_logprob(sched, mo, t, x, c["eta"], noise=noise)
        for name, v in (("model_output", mo), ("sample", x), ("given", given), ("noise", noise),
                        ("log_prob_given", lp_given), ("mean", mean), ("drawn", drawn),
                        ("log_prob_drawn", lp_drawn)):
            io[f"{k}.{name}"] = v
    save(os.path.join(out, "ddim_log_prob"), io)
    return configs


def _load(out, case):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, case, "io.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
