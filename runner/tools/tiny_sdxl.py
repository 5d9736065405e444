"""Build the embedded tiny SDXL (random weights, the real SDXL structure: two CLIP text encoders, micro-conditioning).

It exists so that the SDXL family's parity tests and a first `model=tiny-sdxl` run work offline in seconds. The
shipped files under runner/models/tiny-sdxl were written by

    python -m runner.tools.tiny_sdxl

which is seeded, so it rewrites them byte for byte on the same torch build. Sizes follow diffusers' own
`get_dummy_components` in tests/pipelines/stable_diffusion_xl, except the VAE: four blocks, as in runner.tiny's
tiny-sd, so that the latent scale is 8 as in SDXL (native size 8 latents x 8 = 64 px).
"""

import argparse
from pathlib import Path

from runner import EMBEDDED_MODELS_DIR
from runner.tools.tiny import write_char_tokenizer

DEFAULT_OUT = EMBEDDED_MODELS_DIR / "tiny-sdxl"


def build_tiny_sdxl(out_dir) -> None:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out_dir = Path(out_dir)
    # SDXL ships two tokenizers; the same offline character vocabulary serves both.
    write_char_tokenizer(out_dir / "tokenizer")
    write_char_tokenizer(out_dir / "tokenizer_2")
    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(out_dir / "tokenizer_2")

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        # SDXL's added conditioning: 6 micro-conditioning numbers of 8 Fourier features each, plus the pooled
        # text embedding (text_encoder_2's projection_dim).
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,  # the two encoders' hidden states side by side: 32 + 32
        norm_num_groups=1,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
        scaling_factor=0.13025,  # SDXL's VAE value (SD 1.x uses 0.18215)
    )
    torch.manual_seed(0)
    text_config = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu",
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    # SDXL base 1.0's own scheduler settings.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    out = parser.parse_args(argv).out
    build_tiny_sdxl(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
