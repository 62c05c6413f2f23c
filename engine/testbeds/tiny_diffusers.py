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


WORDS = ("a", "cat", "dog", "photo", "of", "red", "blue", "blurry")
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _vocab() -> dict[str, int]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(set("".join(WORDS))):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for w in WORDS:
        vocab.setdefault(w + "</w>", len(vocab))
    return vocab


def clip_tokenizer(max_length: int = 32):
    """A CLIP tokenizer over :data:`WORDS` (letters as the fallback; vocabulary files written to a temporary
    folder)."""
    import json
    import tempfile

    from transformers import CLIPTokenizer

    vocab = _vocab()
    folder = Path(tempfile.mkdtemp(prefix="indis-tokenizer-"))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def clip_encoder(hidden: int, projection: int | None = None, seed: int = 0, max_length: int = 32):
    """A 1-layer random CLIP text encoder (with a text projection of size ``projection`` when given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(_vocab()), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=max_length,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_vae(**kw):
    """A 2-block random VAE: latents 4 x 8 x 8 for 16 x 16 images."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                   block_out_channels=(8, 8), norm_num_groups=4,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16, **kw).eval()


def tiny_sd_pipe(scheduler=None):
    """A tiny random ``diffusers.StableDiffusionPipeline`` built offline: :func:`clip_tokenizer`, a 1-layer
    CLIP text encoder, :func:`text_unet` and :func:`tiny_vae`; ``scheduler`` defaults to DPM-Solver++ with
    SD's betas."""
    import diffusers

    scheduler = scheduler or diffusers.DPMSolverMultistepScheduler(**SD_BETAS, steps_offset=1)
    return diffusers.StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_encoder(12),
                                             tokenizer=clip_tokenizer(), unet=text_unet(),
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def tiny_sdxl_pipe(scheduler=None):
    """A tiny random ``diffusers.StableDiffusionXLPipeline``: two CLIP encoders (12 wide, and 8 wide with a
    6-wide projection), a UNet taking their 20-wide embeddings and SDXL's ``added_cond_kwargs`` (pooled
    embedding and size ids); ``scheduler`` defaults to Euler with SD's betas (SDXL's own)."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=20, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 + 6 * 4).eval()
    scheduler = scheduler or diffusers.EulerDiscreteScheduler(**SD_BETAS, steps_offset=1)
    return diffusers.StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=clip_encoder(12),
                                               text_encoder_2=clip_encoder(8, projection=6, seed=1),
                                               tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(),
                                               unet=unet, scheduler=scheduler, add_watermarker=False)


def tiny_sd3_pipe(scheduler=None):
    """A tiny random ``diffusers.StableDiffusion3Pipeline``: two CLIP encoders with projections (no T5:
    the pipeline then uses zeros for its tokens), a 1-layer ``SD3Transformer2DModel`` and a VAE with SD3's
    shift; ``scheduler`` defaults to FlowMatch Euler with shift 3."""
    import diffusers

    torch.manual_seed(0)
    net = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=16).eval()
    scheduler = scheduler or diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    return diffusers.StableDiffusion3Pipeline(
        transformer=net, scheduler=scheduler, vae=tiny_vae(shift_factor=0.06, scaling_factor=1.5),
        text_encoder=clip_encoder(8, projection=4), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_encoder(8, projection=4, seed=1), tokenizer_2=clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)


__all__ = ["SD_BETAS", "TEXT", "WORDS", "clip_encoder", "clip_tokenizer", "text_unet", "tiny_sd3_pipe",
           "tiny_sd_pipe", "tiny_sdxl_pipe", "tiny_vae"]
