"""Build the embedded tiny models (random weights, real diffusers/transformers classes).

They exist so that the runner, its tests and a newcomer's first command work offline in seconds.
The weights are random: images are noise-like, but every code path is the one a hub model takes.
The shipped files under runner/models/ were written by

    python -m runner.tools.tiny

which is seeded, so it rewrites them byte for byte on the same torch build. Component sizes follow
diffusers' own `get_dummy_components` in tests/pipelines/stable_diffusion, with one layer per UNet block (smaller files) and a VAE of four blocks
so that the latent scale is 8, as in Stable Diffusion.
"""

import json
from pathlib import Path

from runner import EMBEDDED_MODELS_DIR

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]


def bytes_to_unicode() -> list[str]:
    """CLIP's printable stand-in for each byte (as in openai/CLIP simple_tokenizer)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(printable, codes))]


def write_char_tokenizer(out_dir: Path, model_max_length: int = 77) -> None:
    """A character-level CLIP BPE vocabulary (no merges): every byte and every word-final byte is a token."""
    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + SPECIAL_TOKENS
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(vocab=str(out_dir / "vocab.json"), merges=str(out_dir / "merges.txt"), model_max_length=model_max_length)
    tokenizer.save_pretrained(out_dir)


def build_tiny_sd(out_dir: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_char_tokenizer(out_dir / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer")
    tokenizer.init_kwargs["local_files_only"] = False  # saved below: HF_HUB_OFFLINE=1 would write true, other bytes
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
    ))
    # Stable Diffusion 1.x's own scheduler settings.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)


def build_tiny_ddpm(out_dir: Path) -> None:
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=3, out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(out_dir, safe_serialization=True)


def main() -> None:
    for name, build in [("tiny-sd", build_tiny_sd), ("tiny-ddpm", build_tiny_ddpm)]:
        build(Path(EMBEDDED_MODELS_DIR) / name)
        print(f"wrote {EMBEDDED_MODELS_DIR / name}")


if __name__ == "__main__":
    main()
