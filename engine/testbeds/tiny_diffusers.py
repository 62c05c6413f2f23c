"""Tiny random diffusers models and pipelines, built offline from configs (no weights to download): what the
tests, the diffusers example (``benchmarks/example_diffusers.py``) and a user without a real checkpoint run
indis' diffusers integration on. They need diffusers (and transformers for the pipeline's text encoder).
"""

from __future__ import annotations

from pathlib import Path

import torch

#: The text-condition input of a diffusers ``UNet2DConditionModel``.
TEXT = "encoder_hidden_states"


def text_unet(sample_size: int = 8, channels: int = 4, text_dim: int = 12) -> torch.nn.Module:
    """A tiny random ``diffusers.UNet2DConditionModel`` (cross-attention on ``[B, L, text_dim]`` text
    embeddings), built from a config."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=text_dim, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def tiny_sd_pipe(scheduler=None):
    """A tiny random ``diffusers.StableDiffusionPipeline`` built offline: a CLIP tokenizer over a handful of
    words (vocabulary files written to a temporary folder), a 1-layer CLIP text encoder, :func:`text_unet`
    and a 2-block VAE (latents 4 x 8 x 8 for 16 x 16 images); ``scheduler`` defaults to DPM-Solver++ with
    SD's betas."""
    import json
    import tempfile

    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    words = ["a", "cat", "dog", "photo", "of", "red", "blue", "blurry"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(set("".join(words))):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for w in words:
        vocab.setdefault(w + "</w>", len(vocab))
    folder = Path(tempfile.mkdtemp(prefix="indis-tokenizer-"))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=12, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    encoder = CLIPTextModel(config).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16).eval()
    scheduler = scheduler or diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear",
                                                                   beta_start=0.00085, beta_end=0.012,
                                                                   steps_offset=1)
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                                             unet=text_unet(), scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)


__all__ = ["TEXT", "text_unet", "tiny_sd_pipe"]
