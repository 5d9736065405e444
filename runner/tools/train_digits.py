"""Train the embedded digit models on scikit-learn's bundled handwritten digits (runner/models/digits-*).

    python -m runner.tools.train_digits --out runner/models       # classifier, digits-ddpm, digits-sd, digits-flow
    python -m runner.tools.train_digits --out /tmp/models --only sd --sd-steps 500
    python -m runner.tools.train_digits --out runner/models --only flow  # from the digits-sd in --out, or shipped

- digits-classifier: a small CNN on 8x8 grey images in [0, 1]; the metric of runner/digits.py.
- digits-ddpm: pixel-space DDPM (UNet2DModel + DDPMScheduler), 32x32 RGB (grey replicated), the micro
  counterpart of google/ddpm-cat-256.
- digits-sd: Stable Diffusion's structure at micro scale: CLIPTokenizer (a word-level BPE vocabulary written
  here), a 2-layer CLIPTextModel, an AutoencoderKL (32x32x3 <-> 8x8x4) and a UNet2DConditionModel with
  cross-attention at every resolution. Prompts are "a handwritten digit seven" (a quarter of the time
  "a handwritten digit 7"), and "" 10% of the time so that classifier-free guidance works. The VAE is trained
  first, then the UNet and the text encoder together on the VAE's latents.
- digits-flow: Stable Diffusion 3's structure at micro scale, trained by rectified flow: digits-sd's tokenizer,
  text encoder (twice, as the two CLIPTextModelWithProjection of SD3, each with a new projection) and VAE, no T5,
  and an SD3Transformer2DModel (MMDiT) on the VAE's 8x8x4 latents; the same prompts and 10% empty ones. The
  transformer and both text encoders train together; the VAE stays as it is.

Only the training split of runner.digits.load_digit_split() is used; its held-out fifth is for the tests.
Everything is seeded and runs on one CPU thread (on the shared 2-core machine this was built on, 2 threads were
several times slower than 1), so the same command on the same torch build rewrites the shipped weights.

Measured (torch 2.13 CPU, 1 thread, 2-core machine shared with other work): classifier 0.7 CPU min, digits-ddpm
17.8 CPU min (6,000 steps; 21 min wall), digits-sd 8.2 CPU min (VAE 2.7, UNet + text encoder 5.5; 13 min wall),
digits-flow 9.1 CPU min (4,000 steps 8.1, the rest loading and evaluation; 27 min wall). Re-running it rewrote the
shipped models bit for bit (same sha256). The numbers printed at the end of each stage
say how good each model is.
"""

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from runner import EMBEDDED_MODELS_DIR
from runner.digits import (DIGIT_WORDS, build_classifier, digit_prompt, load_digit_split, render_digits,
                           score_digits, upscale)

SIZE = 32  # the diffusion models' picture size
CLASSIFIER_CONFIG = {
    "architecture": "cnn",  # runner.digits.build_classifier
    "input_size": 8,
    "input_range": [0.0, 1.0],
    "input": "grey (PIL 'L'), area-averaged (BOX) to 8x8, divided by 255; bright ink on a dark background",
    "conv_channels": [16, 32],
    "hidden": 64,
    "num_classes": 10,
    "classes": list(range(10)),
}


# ---------------------------------------------------------------- helpers

def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))


class EMA:
    """Exponential moving average of a module's weights: short trainings sample far better from the average."""

    def __init__(self, module, decay: float):
        self.module, self.decay = copy.deepcopy(module).eval().requires_grad_(False), decay

    @torch.no_grad()
    def update(self, module, step: int):
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: early weights are not worth keeping
        for ema, p in zip(self.module.parameters(), module.parameters()):
            ema.lerp_(p, 1 - decay)


def train_loop(name, params, steps, lr, step_fn, emas=(), log_every=200):
    """AdamW over `params`; `step_fn(step)` returns the loss. Returns CPU seconds per step.

    Both wall and CPU time are logged: on a shared machine the wall time says more about the neighbours."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start, cpu_start, running = time.time(), time.process_time(), 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for ema, module in emas:
            ema.update(module, step)
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed, cpu = time.time() - start, time.process_time() - cpu_start
            print(f"[{name}] step {step + 1}/{steps} loss {running / ((step % log_every) + 1):.4f} "
                  f"{cpu / (step + 1):.3f} CPU s/step; {cpu / 60:.1f} CPU min, {elapsed / 60:.1f} min", flush=True)
            running = 0.0
    return (time.process_time() - cpu_start) / max(1, steps)


def to_model_range(x8, size=SIZE) -> torch.Tensor:
    """(N, 8, 8) in [0, 1] -> (N, 1, size, size) in [-1, 1]; channels are replicated per batch."""
    return upscale(x8, size) * 2 - 1


# ---------------------------------------------------------------- classifier

def train_classifier(out_dir: Path, steps: int, gen: torch.Generator) -> None:
    from safetensors.torch import save_file

    train_x, train_y, test_x, test_y = load_digit_split()
    big = upscale(train_x, SIZE)  # (N, 1, 32, 32), shifted per batch below, then area-averaged back to 8x8
    raw, labels = torch.from_numpy(train_x)[:, None], torch.from_numpy(train_y)
    model = build_classifier(CLASSIFIER_CONFIG)
    batch = 128

    def digits_batch():
        idx = torch.randint(len(big), (batch,), generator=gen)
        x = F.pad(big[idx], (2, 2, 2, 2))
        # shifts of up to 2 pixels at 32x32 (half a pixel at 8x8): generated digits are not all centred as scans are
        ox, oy = torch.randint(0, 5, (2, batch), generator=gen)
        x = torch.stack([x[i, :, oy[i]:oy[i] + SIZE, ox[i]:ox[i] + SIZE] for i in range(batch)])
        x = F.avg_pool2d(x, SIZE // 8)
        x[: batch // 4] = raw[idx[: batch // 4]]  # and some as scanned (sharper than upscaled and averaged back)
        x = x * (0.7 + 0.4 * torch.rand(batch, 1, 1, 1, generator=gen))  # ink strength
        x = x + 0.03 * torch.randn(x.shape, generator=gen)
        return x.clamp(0, 1), labels[idx]

    def outlier_batch(n=32):
        """Non-digits (noise at 32 and 8 pixels, blanks, pixel-shuffled digits), taught to give uniform output:
        without them a softmax is as sure of a noise image as of a digit and class_confidence would say nothing."""
        k = n // 4
        noise32 = F.avg_pool2d(torch.rand(k, 1, SIZE, SIZE, generator=gen), SIZE // 8)
        noise8 = torch.rand(k, 1, 8, 8, generator=gen)
        blank = torch.rand(k, 1, 1, 1, generator=gen).expand(k, 1, 8, 8)
        idx = torch.randint(len(train_x), (k,), generator=gen)
        perm = torch.randperm(64, generator=gen)
        shuffled = torch.from_numpy(train_x)[idx].reshape(k, 64)[:, perm].reshape(k, 1, 8, 8)
        return torch.cat([noise32, noise8, blank, shuffled])

    def step_fn(step):
        x, y = digits_batch()
        loss = F.cross_entropy(model(x), y)
        return loss - 0.5 * F.log_softmax(model(outlier_batch()), dim=1).mean()  # cross-entropy to uniform

    model.train()
    sec = train_loop("classifier", list(model.parameters()), steps, 3e-3, step_fn, log_every=500)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(CLASSIFIER_CONFIG, indent=2) + "\n")
    # Evaluate through the public metric, on the held-out digits as pictures of the models' size.
    scores = score_digits(render_digits(test_x, SIZE), test_y.tolist(), path=str(out_dir))
    acc = np.mean([s["predicted_digit"] == y for s, y in zip(scores, test_y)])
    noise = np.random.default_rng(0).integers(0, 256, (100, SIZE, SIZE, 3), dtype=np.uint8)
    noise_conf = np.mean([s["class_confidence"] for s in score_digits(noise, path=str(out_dir))])
    print(f"[classifier] {sec:.3f} CPU s/step; held-out accuracy {acc:.4f}; mean confidence on noise {noise_conf:.3f}",
          flush=True)


# ---------------------------------------------------------------- digits-ddpm

def min_snr_weights(scheduler, t, gamma: float | None):
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023): nearly clean timesteps, whose noise is
    easy to see but matters little, count less; it converges several times faster. None: plain MSE."""
    if gamma is None:
        return torch.ones(len(t))
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / snr


def train_ddpm(out_dir: Path, steps: int, gen: torch.Generator, classifier: str | None = None, batch: int = 16,
               lr: float = 2e-3, snr_gamma: float | None = 5.0) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    train_x = load_digit_split()[0]
    data = to_model_range(train_x)
    unet = UNet2DModel(
        sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32, 64),
        norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000)  # ddpm-cat-256's: linear betas, clipped x0
    ema = EMA(unet, 0.995)

    def step_fn(step):
        x0 = data[torch.randint(len(data), (batch,), generator=gen)].expand(-1, 3, -1, -1)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        error = (unet(scheduler.add_noise(x0, noise, t), t).sample - noise).pow(2).mean(dim=(1, 2, 3))
        return (min_snr_weights(scheduler, t, snr_gamma) * error).mean()

    unet.train()
    sec = train_loop("ddpm", list(unet.parameters()), steps, lr, step_fn, emas=[(ema, unet)])
    pipe = DDPMPipeline(unet=ema.module, scheduler=scheduler)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    print(f"[ddpm] {sec:.3f} CPU s/step", flush=True)
    evaluate_ddpm(out_dir, classifier)


@torch.no_grad()
def evaluate_ddpm(model_dir: Path, classifier: str | None = None, n: int = 32, steps: int = 50) -> float:
    from diffusers import DDIMScheduler, DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(model_dir, use_safetensors=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(s) for s in range(n)]
    images = pipe(batch_size=n, generator=gens, num_inference_steps=steps, output_type="np").images
    scores = score_digits((images * 255).round().astype(np.uint8), path=classifier)
    rate = np.mean([s["class_confidence"] > 0.9 for s in scores])
    counts = np.bincount([s["predicted_digit"] for s in scores], minlength=10)
    print(f"[ddpm] DDIM {steps} steps: {rate:.2f} of {n} samples confidently a digit; predicted digits {counts}",
          flush=True)
    return rate


# ---------------------------------------------------------------- digits-sd

def write_word_tokenizer(out_dir: Path, words, model_max_length: int = 16):
    """A CLIP BPE vocabulary of all single bytes (so any prompt tokenizes) plus merges that make each prompt
    word one token: "seven" -> "seven</w>"."""
    from transformers import CLIPTokenizer

    from runner.tools.tiny import SPECIAL_TOKENS, bytes_to_unicode

    chars = bytes_to_unicode()
    vocab, merges = chars + [c + "</w>" for c in chars], []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:  # merge left to right: "s e", "se v", "sev e", "seve n</w>"
            merges.append(f"{current} {part}")
            current += part
            vocab.append(current)
    vocab = list(dict.fromkeys(vocab)) + SPECIAL_TOKENS
    merges = list(dict.fromkeys(merges))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=str(out_dir / "vocab.json"), merges=str(out_dir / "merges.txt"),
                              model_max_length=model_max_length)
    for word in words:  # a later merge could have split an earlier word; make sure none did
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert ids == [vocab.index(word + "</w>")], (word, ids)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def sd_components(tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    # 32x32x3 <-> 8x8x4: three blocks, so the pipeline's latent scale is 2 ** (3 - 1) = 4.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=SIZE,
    )
    # Cross-attention at both resolutions (8x8 and 4x4) and in the mid block: with it only at the finest level the
    # prompt was barely learned in a short training.
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=4,
    )
    return text_encoder, vae, unet


def train_sd(out_dir: Path, vae_steps: int, unet_steps: int, gen: torch.Generator, classifier: str | None = None,
             kl_weight: float = 1e-3) -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    train_x, train_y = load_digit_split()[:2]
    data = to_model_range(train_x)
    words = ["a", "handwritten", "digit"] + DIGIT_WORDS
    tokenizer = write_word_tokenizer(out_dir / "tokenizer", words)
    text_encoder, vae, unet = sd_components(tokenizer)
    batch = 32

    # 1. the VAE: reconstruction (summed squared error per image) plus a small KL term that keeps latents tame
    def vae_step(step):
        x0 = data[torch.randint(len(data), (batch,), generator=gen)].expand(-1, 3, -1, -1)
        posterior = vae.encode(x0).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        return (F.mse_loss(recon, x0, reduction="sum") + kl_weight * posterior.kl().sum()) / batch

    vae.train()
    sec = train_loop("vae", list(vae.parameters()), vae_steps, 1e-3, vae_step)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        posterior = vae.encode(data.expand(-1, 3, -1, -1)).latent_dist
        mean, std = posterior.mean, posterior.std
        recon = vae.decode(mean).sample
        latents = posterior.sample(generator=gen)
    # Stable Diffusion's convention: the UNet sees latents * scaling_factor, of about unit variance.
    scaling_factor = round(float(1 / latents.std()), 4)
    vae.register_to_config(scaling_factor=scaling_factor)
    recon_images = ((recon[:, 0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    recon_acc = np.mean([s["predicted_digit"] == y for s, y in zip(score_digits(recon_images, path=classifier), train_y)])
    print(f"[vae] {sec:.3f} CPU s/step; recon MSE {F.mse_loss(recon, data.expand(-1, 3, -1, -1)):.5f}; "
          f"classifier accuracy on reconstructions {recon_acc:.4f}; latent mean {float(latents.mean()):.3f} "
          f"std {float(latents.std()):.3f} -> scaling_factor {scaling_factor}", flush=True)

    # 2. the UNet and the text encoder, together, on the frozen VAE's latents
    prompts = PromptIds(tokenizer, torch.from_numpy(train_y))
    # SD 1.x's betas and steps_offset; latents are never clipped (from_config passes clip_sample=False on to DDIM)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    ema_unet, ema_text = EMA(unet, 0.995), EMA(text_encoder, 0.995)

    def unet_step(step):
        z0, input_ids = latent_batch(mean, std, scaling_factor, prompts, batch, gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        hidden = text_encoder(input_ids)[0]
        return F.mse_loss(unet(scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=hidden).sample, noise)

    unet.train(), text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    sec = train_loop("sd-unet", params, unet_steps, 1e-3, unet_step, emas=[(ema_unet, unet), (ema_text, text_encoder)])
    pipe = StableDiffusionPipeline(unet=ema_unet.module, vae=vae, text_encoder=ema_text.module, tokenizer=tokenizer,
                                   scheduler=sd_inference_scheduler(scheduler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    print(f"[sd-unet] {sec:.3f} CPU s/step", flush=True)
    evaluate_sd(out_dir, classifier)


class PromptIds:
    """The token ids a training batch draws from: each digit's word prompt ("a handwritten digit seven") and numeral
    prompt ("... 7"), and the empty prompt of classifier-free guidance's unconditional share."""

    def __init__(self, tokenizer, labels):
        def ids(prompts):
            return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids

        self.labels = labels
        self.words = ids([digit_prompt(d) for d in range(10)])
        self.numerals = ids([digit_prompt(d, True) for d in range(10)])
        self.empty = ids([""])[0]


def latent_batch(mean, std, scaling_factor, prompts: PromptIds, batch: int, gen):
    """A batch of training latents (sampled from the frozen VAE's posteriors, scaled) and their prompts' ids: a
    quarter numerals, 10% empty (unconditional, for classifier-free guidance), the rest words."""
    idx = torch.randint(len(mean), (batch,), generator=gen)
    latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling_factor
    u = torch.rand(batch, generator=gen)
    input_ids = torch.where((u < 0.25)[:, None], prompts.numerals[prompts.labels[idx]],
                            prompts.words[prompts.labels[idx]])
    input_ids[u > 0.9] = prompts.empty
    return latents, input_ids


def score_prompted(pipe, seeds, steps: int, guidance: float, classifier) -> tuple[float, float]:
    """Every digit's prompt drawn with each seed: (share classified as the prompted digit, mean adherence)."""
    digits = [d for d in range(10) for _ in seeds]
    gens = [torch.Generator("cpu").manual_seed(s) for _ in range(10) for s in seeds]
    images = pipe([digit_prompt(d) for d in digits], generator=gens, num_inference_steps=steps,
                  guidance_scale=guidance, output_type="np").images
    scores = score_digits((images * 255).round().astype(np.uint8), digits, path=classifier)
    acc = np.mean([s["predicted_digit"] == d for s, d in zip(scores, digits)])
    return acc, np.mean([s["prompt_adherence"] for s in scores])


def sd_inference_scheduler(training_scheduler):
    """The scheduler digits-sd ships with, as Stable Diffusion 1.x's: PNDM (PLMS) with the training betas, and
    clip_sample=false kept in its config, so that DDIM and DDPM built from it never clip latents."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler.from_config(training_scheduler.config, skip_prk_steps=True, set_alpha_to_one=False)
    scheduler.register_to_config(clip_sample=False)
    return scheduler


@torch.no_grad()
def evaluate_sd(model_dir: Path, classifier: str | None = None, seeds=(0, 1, 2), steps: int = 30,
                guidances=(1.0, 3.0, 7.5)) -> dict:
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for guidance in guidances:
        acc, adherence = results[guidance] = score_prompted(pipe, seeds, steps, guidance, classifier)
        print(f"[sd] UniPC {steps} steps, guidance {guidance}: classified as prompted {acc:.3f}, "
              f"mean adherence {adherence:.3f}", flush=True)
    return results


# ---------------------------------------------------------------- digits-flow

FLOW_PROJECTION_DIM = 32  # each CLIP encoder's projection; the pooled conditioning is both side by side


class RepeatedTokenAttention:
    """SD3's joint attention (diffusers' JointAttnProcessor2_0) where the last context token stands for `copies`
    identical tokens, for training only.

    Without T5, StableDiffusion3Pipeline appends T5_TOKENS (256) zero embeddings to the 16 CLIP tokens. Every
    operation on a context token but attention is per token, so those 256 stay identical through every block, and in
    attention `copies` identical keys weigh as one key whose score is raised by log(copies). One zero token with that
    bias computes the same function (and gradients) as 256 at a fraction of the cost; the shipped model is then drawn
    the usual way, with all 256 (tests/test_flow_digits.py checks that the two agree)."""

    def __init__(self, copies: int):
        self.log_copies = float(np.log(copies))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        def heads(x, norm=None):
            x = x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        image_tokens = hidden_states.shape[1]
        query = torch.cat([heads(attn.to_q(hidden_states), attn.norm_q),
                           heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
        key = torch.cat([heads(attn.to_k(hidden_states), attn.norm_k),
                         heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
        value = torch.cat([heads(attn.to_v(hidden_states)), heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
        bias = torch.zeros(1, key.shape[2], dtype=query.dtype)  # added to every query's scores
        bias[0, -1] = self.log_copies
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, query.shape[1] * query.shape[-1])
        hidden_states, encoder_hidden_states = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return attn.to_out[1](attn.to_out[0](hidden_states)), encoder_hidden_states


def flow_components(sd_dir: Path, layers: int):
    """digits-flow's parts: digits-sd's tokenizer (for both CLIP slots), two copies of digits-sd's text encoder as
    CLIPTextModelWithProjection with new projections, digits-sd's VAE, and a new SD3Transformer2DModel on its
    8x8x4 latents (2x2 patches: 16 image tokens). No T5: the pipeline then conditions on zeros in its place."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
    sd_text = CLIPTextModel.from_pretrained(sd_dir / "text_encoder", use_safetensors=True)
    encoders = []
    for _ in range(2):
        config = CLIPTextConfig.from_pretrained(sd_dir / "text_encoder", projection_dim=FLOW_PROJECTION_DIM)
        encoder = CLIPTextModelWithProjection(config)
        encoder.text_model.load_state_dict(sd_text.state_dict())  # all but the new projection is digits-sd's
        encoders.append(encoder)
    # From its config and weights: from_pretrained would write the path it came from into the copy's config.
    # fork_rng: the random init, overwritten at once, leaves the seeded stream to the transformer's init.
    with torch.random.fork_rng():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(sd_dir / "vae"))
    vae.load_state_dict(load_file(sd_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    hidden = sd_text.config.hidden_size
    transformer = SD3Transformer2DModel(
        sample_size=SIZE // 4, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=2 * hidden, caption_projection_dim=64,
        pooled_projection_dim=2 * FLOW_PROJECTION_DIM, pos_embed_max_size=8, qk_norm="rms_norm",
    )
    return tokenizer, encoders, vae, transformer


def train_flow(out_dir: Path, sd_dir: Path, steps: int, gen: torch.Generator, classifier: str | None = None,
               shift: float = 3.0, layers: int = 6, batch: int = 32, lr: float = 1e-3) -> None:
    """Rectified flow (Esser et al. 2024): x_sigma = (1 - sigma) x0 + sigma noise, the transformer learns the
    velocity noise - x0 at timestep 1000 sigma, sigma drawn logit-normal (SD3's choice: mid noise levels most)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from runner.families.sd3 import T5_TOKENS

    train_x, train_y = load_digit_split()[:2]
    data = to_model_range(train_x)
    tokenizer, encoders, vae, transformer = flow_components(sd_dir, layers)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        posterior = vae.encode(data.expand(-1, 3, -1, -1)).latent_dist
        mean, std = posterior.mean, posterior.std
    # SD3's VAE convention, latents = (x - shift_factor) * scaling_factor; digits-sd's latents are centred enough
    # (the mean is printed) that its scale alone serves, with shift 0.
    vae.register_to_config(shift_factor=0.0)
    scaling_factor = vae.config.scaling_factor
    print(f"[flow] digits-sd latents: mean {float(mean.mean()):.3f}, scaled std "
          f"{float((mean * scaling_factor).std()):.3f}", flush=True)

    prompts = PromptIds(tokenizer, torch.from_numpy(train_y))

    def condition(text_encoders, input_ids):
        """As the pipeline encodes a prompt: both CLIPs' penultimate states side by side, then the zero token that
        stands for T5's 256; pooled: both projections."""
        outs = [encoder(input_ids, output_hidden_states=True) for encoder in text_encoders]
        clip = torch.cat([out.hidden_states[-2] for out in outs], dim=-1)
        t5 = torch.zeros(len(input_ids), 1, clip.shape[-1])
        return torch.cat([clip, t5], dim=1), torch.cat([out.text_embeds for out in outs], dim=-1)

    emas = [EMA(transformer, 0.995)] + [EMA(encoder, 0.995) for encoder in encoders]
    transformer.set_attn_processor(RepeatedTokenAttention(T5_TOKENS))  # after the EMA copy, which keeps the default

    def flow_step(step):
        x0, input_ids = latent_batch(mean, std, scaling_factor, prompts, batch, gen)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(batch, generator=gen))
        noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        embeds, pooled = condition(encoders, input_ids)
        velocity = transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=embeds,
                               pooled_projections=pooled).sample
        return F.mse_loss(velocity, noise - x0)

    transformer.train(), [encoder.train() for encoder in encoders]
    modules = [transformer] + encoders
    params = [p for module in modules for p in module.parameters()]
    sec = train_loop("flow", params, steps, lr, flow_step, emas=list(zip(emas, modules)))
    ema_transformer, ema_1, ema_2 = (ema.module for ema in emas)
    pipe = StableDiffusion3Pipeline(
        transformer=ema_transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=ema_1, tokenizer=tokenizer, text_encoder_2=ema_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    print(f"[flow] {sec:.3f} CPU s/step", flush=True)
    evaluate_flow(out_dir, classifier)


@torch.no_grad()
def evaluate_flow(model_dir: Path, classifier: str | None = None, seeds=(0, 1, 2), steps: int = 20,
                  guidances=(1.0, 3.0, 7.5), shifts=(1.0, 3.0)) -> dict:
    """digits-flow through StableDiffusion3Pipeline, its flow Euler scheduler at each shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, use_safetensors=True, text_encoder_3=None,
                                                    tokenizer_3=None)  # diffusers wants left-out parts named
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for shift in shifts:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
        for guidance in guidances:
            acc, adherence = results[shift, guidance] = score_prompted(pipe, seeds, steps, guidance, classifier)
            print(f"[flow] flow Euler shift {shift} {steps} steps, guidance {guidance}: classified as prompted "
                  f"{acc:.3f}, mean adherence {adherence:.3f}", flush=True)
    return results


# ---------------------------------------------------------------- CLI

MODELS = ["classifier", "ddpm", "sd", "flow"]  # in training order: flow starts from digits-sd


def sd_dir(out: Path) -> Path:
    """The digits-sd that digits-flow starts from: the one just trained into `out`, else the shipped one."""
    trained = out / "digits-sd"
    return trained if (trained / "model_index.json").exists() else EMBEDDED_MODELS_DIR / "digits-sd"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=EMBEDDED_MODELS_DIR)
    parser.add_argument("--only", nargs="+", choices=MODELS, default=MODELS,
                        help="which models to train (the diffusion models' printed scores use the classifier in --out; "
                             "flow starts from the digits-sd in --out, or the shipped one)")
    parser.add_argument("--classifier-steps", type=int, default=3000)
    parser.add_argument("--ddpm-steps", type=int, default=6000)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--sd-steps", type=int, default=2000)
    parser.add_argument("--flow-steps", type=int, default=4000)
    parser.add_argument("--flow-shift", type=float, default=3.0, help="the shift digits-flow's scheduler ships with")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 reproduces the shipped weights)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    # The diffusion models are scored with the classifier in --out, or the shipped one if --out has none.
    classifier = args.out / "digits-classifier"
    classifier = str(classifier) if "classifier" in args.only or (classifier / "config.json").exists() else None
    jobs = {"classifier": lambda gen: train_classifier(args.out / "digits-classifier", args.classifier_steps, gen),
            "ddpm": lambda gen: train_ddpm(args.out / "digits-ddpm", args.ddpm_steps, gen, classifier),
            "sd": lambda gen: train_sd(args.out / "digits-sd", args.vae_steps, args.sd_steps, gen, classifier),
            "flow": lambda gen: train_flow(args.out / "digits-flow", sd_dir(args.out), args.flow_steps, gen, classifier,
                                           shift=args.flow_shift)}
    for name in MODELS:
        if name in args.only:
            # One seed per model, so each reproduces alone (--only) as in a full run.
            torch.manual_seed(args.seed)
            gen = torch.Generator("cpu").manual_seed(args.seed)
            start, cpu_start = time.time(), time.process_time()
            jobs[name](gen)
            print(f"[{name}] done in {(time.process_time() - cpu_start) / 60:.1f} CPU min, "
                  f"{(time.time() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
