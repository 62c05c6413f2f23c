"""Using indis with diffusers, end to end: the three-line sampler, the pipeline runner and the scheduler shim
on a Stable Diffusion pipeline, each checked against the pipe's own call.

    python benchmarks/example_diffusers.py                      # a tiny random SD pipeline, built offline
    python benchmarks/example_diffusers.py --pipe DIR --steps 20 --prompt "a photo of a cat"   # your own
    python benchmarks/example_diffusers.py --out benchmarks/results/diffusers   # + the printout and a PNG

Prints, for each way in, the largest difference of its latents to the pipe's own (relative to the largest
latent): on the pipe's DPM-Solver++ grid all three compute what diffusers computes, to float32 rounding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import indis
from indis.engine.testbeds.tiny_diffusers import TEXT, tiny_sd_pipe


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipe", help="a local StableDiffusionPipeline folder (default: a tiny random one)")
    ap.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    ap.add_argument("--negative", default="blurry", help="the negative prompt")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write example.md (this printout) and images.png here")
    args = ap.parse_args(argv)
    import diffusers

    if args.pipe:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(args.pipe)
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    else:
        pipe = tiny_sd_pipe()
    prompts = args.prompt or ["a photo of a cat", "a red dog"]
    negative = [args.negative] * len(prompts)
    pipe.set_progress_bar_config(disable=True)
    common = dict(negative_prompt=negative, guidance_scale=args.guidance)
    lines = [f"pipeline: {args.pipe or 'tiny random StableDiffusionPipeline'}; prompts {prompts}; "
             f"{args.steps} DPM-Solver++(2M) steps, CFG {args.guidance}, seed {args.seed}", ""]

    # The pipe itself.
    ref = pipe(prompts, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
               output_type="latent", **common).images

    # 1. Three lines: the network, the scheduler's grid, indis.sample with classifier-free guidance.
    den = indis.from_diffusers(pipe.unet, pipe.scheduler)
    grid = indis.grid_from_scheduler(pipe.scheduler, args.steps)
    embeds, neg = pipe.encode_prompt(prompts, pipe.device, 1, True, negative)
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        latents = indis.sample(den, noise, grid, "dpmpp_2m", cond={TEXT: embeds}, uncond={TEXT: neg},
                               guidance_scale=args.guidance)
    lines.append(f"indis.sample (from_diffusers + grid_from_scheduler): {rel(latents, ref):.1e}")

    # 2. The pipeline runner: the pipe's encoders and VAE around indis.
    generator = torch.Generator().manual_seed(args.seed)
    out = indis.diffusers_pipeline(pipe, prompts, nfe=args.steps, generator=generator, output_type="latent",
                                   progress=False, **common).images
    lines.append(f"indis.diffusers_pipeline(schedule='scheduler'):      {rel(out, ref):.1e}")

    # 3. The scheduler shim: the pipe as it is, stepping indis' solver on the same grid.
    original = pipe.scheduler
    pipe.scheduler = indis.IndisScheduler.from_config(original.config, sigmas=grid.tolist(),
                                                      solver="dpmpp_2m", init_noise_sigma=1.0)
    shim = pipe(prompts, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
                output_type="latent", **common).images
    pipe.scheduler = original
    lines.append(f"pipe with IndisScheduler:                            {rel(shim, ref):.1e}")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        given = argv if argv is not None else sys.argv[1:]
        command = "python benchmarks/example_diffusers.py " + " ".join(given)
        text = ("# Using indis with diffusers: the example's printout\n\n"
                f"`{command.strip()}`\n\nLargest latent difference to the pipe's own call, relative to the "
                "largest latent:\n\n```\n" + "\n".join(lines) + "\n```\n")
        (args.out / "example.md").write_text(text)
        from PIL import Image

        images = indis.diffusers_pipeline(pipe, prompts, nfe=args.steps, seeds=list(range(len(prompts))),
                                          output_type="pil", progress=False, **common).images
        sheet = Image.new("RGB", (sum(im.width for im in images), images[0].height))
        for k, im in enumerate(images):
            sheet.paste(im, (k * im.width, 0))
        sheet.save(args.out / "images.png")
        print(f"wrote {args.out / 'example.md'} and {args.out / 'images.png'}")


if __name__ == "__main__":
    main()
