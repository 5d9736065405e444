"""Build the embedded tiny SD3 and Flux models (random weights, real diffusers/transformers classes), offline.

    python -m runner.tools.tiny_flow [--out DIR]

writes DIR/tiny-sd3 and DIR/tiny-flux (DIR defaults to runner/models). Seeded, so it rewrites them byte for byte
on the same torch build. Component sizes follow diffusers' own `get_dummy_components` in
tests/pipelines/stable_diffusion_3 and tests/pipelines/flux, with the structure of the real models where it costs
little: a four-block VAE (latent scale 8) with 16 latent channels and a shift factor, SD3's patch size 2, CLIP
encoders of two widths (so that swapping them fails), and each pipeline's real scheduler settings. The tokenizers
are built here too (the dummy components fetch theirs from the hub): CLIP's character-level one from runner.tools.tiny,
and a Unigram T5 tokenizer over a few characters.
"""

import argparse
import string
from pathlib import Path

from runner import EMBEDDED_MODELS_DIR
from runner.tools.tiny import write_char_tokenizer

T5_MAX_LENGTH = 512  # the longest any pipeline asks of T5


def write_t5_tokenizer(out_dir: Path) -> None:
    """A T5-style tokenizer: Unigram over letters, digits and punctuation (with word-initial letters), Metaspace
    pre-tokenizing, `</s>` appended, ids 0/1/2 for <pad>/</s>/<unk> as in T5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    chars = ["▁"] + list(string.ascii_letters + string.digits + string.punctuation)
    words = ["▁" + c for c in string.ascii_letters]
    vocab = [(t, 0.0) for t in specials] + [(c, -2.0) for c in chars] + [(w, -3.0) for w in words]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=specials.index("<unk>")))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", specials.index("</s>"))])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    T5TokenizerFast(tokenizer_file=str(out_dir / "tokenizer.json"), eos_token="</s>", pad_token="<pad>",
                    unk_token="<unk>", extra_ids=0, model_max_length=T5_MAX_LENGTH).save_pretrained(out_dir)


def clip_tokenizer(out_dir: Path):
    from transformers import CLIPTokenizer

    write_char_tokenizer(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)


def clip_config(tokenizer, hidden_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
        num_hidden_layers=5, vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu", projection_dim=hidden_size,
    )


def t5_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))


def vae(scaling_factor: float, shift_factor: float):
    """Four blocks (latent scale 8), 16 latent channels, no quant convs: the SD3/Flux VAE's shape, tiny."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8,
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def build_tiny_sd3(out_dir) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5TokenizerFast

    out_dir = Path(out_dir)
    tokenizer, tokenizer_2 = clip_tokenizer(out_dir / "tokenizer"), clip_tokenizer(out_dir / "tokenizer_2")
    write_t5_tokenizer(out_dir / "tokenizer_3")
    tokenizer_3 = T5TokenizerFast.from_pretrained(out_dir / "tokenizer_3")
    # CLIP-L and CLIP-G widths (32, 48) sum to 80 < T5's 96, so the CLIP states are zero-padded as in SD3.
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(clip_config(tokenizer, 32))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer_2, 48))
    torch.manual_seed(0)
    text_encoder_3 = t5_encoder(tokenizer_3, 96)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=80,
        pos_embed_max_size=32,
    )
    torch.manual_seed(0)
    autoencoder = vae(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's values
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3's scheduler config
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=autoencoder, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def build_tiny_flux(out_dir, guidance_embeds: bool = False) -> None:
    """`guidance_embeds=False` is FLUX.1-schnell's kind (the shipped one), True FLUX.1-dev's (tests build it)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5TokenizerFast

    out_dir = Path(out_dir)
    tokenizer = clip_tokenizer(out_dir / "tokenizer")
    write_t5_tokenizer(out_dir / "tokenizer_2")
    tokenizer_2 = T5TokenizerFast.from_pretrained(out_dir / "tokenizer_2")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_config(tokenizer, 32))
    torch.manual_seed(0)
    text_encoder_2 = t5_encoder(tokenizer_2, 64)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds,
    )
    torch.manual_seed(0)
    autoencoder = vae(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's values
    # FLUX.1-dev's scheduler config: shift resolution-dependent (dynamic), so the tests exercise mu
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=autoencoder, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipe.save_pretrained(out_dir, safe_serialization=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(EMBEDDED_MODELS_DIR), help="default: runner/models")
    args = parser.parse_args(argv)
    for name, build in [("tiny-sd3", build_tiny_sd3), ("tiny-flux", build_tiny_flux)]:
        build(args.out / name)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
