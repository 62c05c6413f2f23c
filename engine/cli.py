"""``indis`` command line: tune an INDIS predictor, evaluate it, export models for deployment.

``indis generate --backbone fashion-unet --nfe 5 --seeds 0-63 --out DIR`` writes samples (``.npz``) and a
PNG grid for any shipped backbone, solver, NFE and schedule (also under ``torchrun``); ``indis fd
DIR/samples.npz`` prints their FD to the data (``indis.engine.generation``).
``indis fit --backbone unet --nfe 5 --solver ipndm --out phi.safetensors`` tunes phi (staged from its blind
schedule) with teacher end points cached under ``--cache``; ``indis eval phi.safetensors`` compares it with
the heuristic grids on held-out seeds (teacher MSE / PSNR). Both call the library functions
(``indis.fit_predictor``, ``indis.engine.tuning.fit.evaluate``). ``indis export --model unet --model dit
--predictor phi.safetensors --onnx-dir onnx --engine-dir engines`` writes ONNX files (checked against torch)
and, where TensorRT is installed, engines -- with the TensorRT demo's flags (``indis.export``).

A mistake of the user's (a bad value, a missing, corrupt or unwritable file: ``ValueError`` / ``OSError``)
prints one line and exits with status 2, like argparse's own usage errors; any other exception is a bug and
keeps its traceback. ``fit`` checks that ``--out`` can be written before it starts tuning.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from indis.engine.core.solvers import SOLVERS

HELD_OUT = 1 << 20  # first held-out seed: never used for tuning (train/val seeds start at 0)
#: Errors that are the user's to fix (a bad value, a missing or unwritable file): one line, exit status 2.
USER_ERRORS = (ValueError, OSError)


def check_writable(path: str | Path) -> Path:
    """``path`` as a file this process can create (its folder made if missing), checked by writing a
    probe file beside it -- before hours of work that would end in writing there."""
    named_as_folder = str(path).endswith(("/", os.sep))
    path = Path(path)
    if path.is_dir() or named_as_folder:
        raise IsADirectoryError(f"--out {path} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        reason = "a part of its folder is a file" if isinstance(e, FileExistsError) else e.strerror or e
        raise PermissionError(f"--out {path} cannot be written ({reason})") from e
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"--out {path} exists and is not writable")
    return path


def _fit(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from indis.engine.testbeds.digits import load_backbone
    from indis.engine.tuning.fit import PHI_FIT, blind_stage_config, fit_predictor

    check_writable(args.out)
    model = load_backbone(args.backbone)
    overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size))
                 if v is not None}
    fit_config = replace(PHI_FIT, **overrides) if overrides else None
    blind_config = None if args.steps is None else replace(blind_stage_config(fit_config), steps=args.steps)
    phi = fit_predictor(model, nfe=args.nfe, solver=args.solver, shape=(1, 8, 8), sigma_min=0.002,
                        sigma_max=80.0, backbone=f"digits-{args.backbone}", pool=args.pool,
                        hidden=args.hidden,
                        shift_bound=args.shift_bound, scale_bound=args.scale_bound, num_train=args.num_train,
                        num_val=args.num_val, cache_dir=args.cache,
                        fit_config=fit_config, blind_config=blind_config)
    print(f"start: {phi.start['chosen']} (teacher MSE of each candidate on the tuning seeds: "
          + ", ".join(f"{k} {v:.4g}" for k, v in phi.start["candidates"].items()) + ")")
    for stage, r in zip(("blind", "phi"), phi.fit_results, strict=False):
        print(f"{stage}: validation teacher MSE {r.init_val:.5g} -> {r.best_val:.5g} "
              f"(kept step {r.best_step}, {r.wall_s:.0f} s)")
    phi.save(args.out, fit=[r.__dict__ | {"history": r.history[-1:]} for r in phi.fit_results],
             start=phi.start)
    print(f"wrote {args.out}")


def _eval(args: argparse.Namespace) -> None:
    from indis.engine.core.predictor import HEURISTICS, Predictor, PredictorConfig, ScheduleConfig
    from indis.engine.testbeds.digits import load_backbone
    from indis.engine.tuning.fit import TuningSetup, evaluate

    phi = Predictor.load(args.checkpoint)
    c = phi.config
    kind = c.backbone.removeprefix("digits-")
    model = load_backbone(kind)
    setup = TuningSetup(model, c.schedule, c.solver, c.shape, c.backbone, cache_dir=args.cache)
    cache, seeds = setup.cache(), range(HELD_OUT, HELD_OUT + args.samples)
    cache.build(model, seeds)
    test = cache.load(seeds)
    print(f"{c.backbone}, {c.solver}, NFE {c.schedule.nfe}, {args.samples} held-out seeds "
          f"[{seeds.start}, {seeds.stop}); teacher {cache.teacher}")
    rows = [(f"heuristic {h}", Predictor(PredictorConfig(
        ScheduleConfig(**{**c.schedule.__dict__, "init": h}), c.solver, c.shape, blind=True)))
        for h in HEURISTICS]
    rows.append(("INDIS phi", phi))
    for name, head in rows:
        mse = float(evaluate(head, model, test, c.solver).mean())
        psnr = 10 * math.log10(4.0 / mse)  # data range [-1, 1]
        print(f"  {name:28s} teacher MSE {mse:.5f}   PSNR {psnr:6.2f} dB")


def _export(args: argparse.Namespace) -> None:
    import time
    from pathlib import Path

    from indis.engine.core.predictor import Predictor
    from indis.engine.testbeds.digits import load_backbone
    from indis.export.models import denoiser_spec, predictor_spec
    from indis.export.onnx_export import export_onnx, is_current
    from indis.export.tensorrt_backend import build_engine, tensorrt_version

    batch_opt = args.batch_opt or min(8, args.batch_max)
    batches = {"batch_min": args.batch_min, "batch_opt": batch_opt, "batch_max": args.batch_max}
    jobs = []
    for kind in args.model:
        cond = {"class_labels": 10} if kind == "dit" else None
        jobs.append((kind, lambda kind=kind, cond=cond: denoiser_spec(
            load_backbone(kind), (1, 8, 8), name=kind, cond=cond, input_std=5.0, **batches)))
    for path in args.predictor:
        name = Path(path).stem
        jobs.append((name, lambda path=path, name=name: predictor_spec(Predictor.load(path), name=name,
                                                                       **batches)))
    if not jobs:
        raise ValueError("nothing to export (give --model and/or --predictor)")
    suffix = ".fp16.onnx" if args.fp16 else ".onnx"
    trt = tensorrt_version() if args.engine_dir else None
    if args.engine_dir and trt is None:
        print("TensorRT is not installed here: ONNX files only, no engines (README: unverified on hardware)")
    for i, (name, make_spec) in enumerate(jobs, 1):
        spec, onnx_path = make_spec(), Path(args.onnx_dir) / f"{name}{suffix}"
        tag = f"[{i}/{len(jobs)}] {name}"
        if is_current(spec, onnx_path, fp16=args.fp16) and not args.force_export:
            print(f"{tag}: {onnx_path} is up to date (same weights, batch range, precision)", flush=True)
        else:
            print(f"{tag}: exporting to {onnx_path} ...", flush=True)
            t0 = time.perf_counter()
            r = export_onnx(spec, onnx_path, fp16=args.fp16, opset=args.opset, verify=not args.no_verify)
            note = f", fell back from dynamo: {r.fallback_reason}" if r.fallback_reason else ""
            print(f"{tag}: done in {time.perf_counter() - t0:.1f} s ({r.exporter} exporter{note}); "
                  f"onnxruntime vs torch at batch 1 and 3: max |err| {r.max_abs_error:.2e} "
                  f"(relative {r.max_rel_error:.2e})", flush=True)
        if trt is not None:
            print(f"{tag}: building TensorRT {trt} engine ...", flush=True)
            plan = build_engine(onnx_path, args.engine_dir, precision="fp16" if args.fp16 else "fp32",
                                opt_level=args.opt_level, timing_cache=args.timing_cache,
                                force=args.force_build or args.force_export)
            print(f"{tag}: engine {plan}", flush=True)


def _generate(args: argparse.Namespace) -> None:
    from indis.engine.generation import (
        BACKBONES,
        generate,
        parse_seeds,
        resolve_schedule,
        save,
        seed_labels,
        world,
    )

    torch.set_num_threads(args.threads)  # also under torchrun: the same count gives the same samples
    rank, size = world()
    if size > 1:
        import torch.distributed as dist

        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if args.device == "cuda" else \
            torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        device = torch.device(args.device)
    try:
        backbone = BACKBONES[args.backbone]
        seeds = parse_seeds(args.seeds)
        labels = seed_labels(seeds, backbone, args.labels)
        model = backbone.load(args.weights).to(device)
        fn = resolve_schedule(args.schedule, model, backbone, args.nfe, args.solver, args.labels,
                              args.backbone)
        samples = generate(model, backbone, seeds, labels, fn, args.solver, args.batch_size, device,
                           progress=not args.no_progress)
        if samples is not None:  # rank 0 (or the only process) writes
            settings = {k: getattr(args, k) for k in ("backbone", "nfe", "solver", "schedule", "labels",
                                                       "seeds", "batch_size")}
            settings |= {"world_size": size, "threads": torch.get_num_threads(), "torch": torch.__version__}
            npz, png = save(args.out, samples, seeds, labels, settings)
            print(f"wrote {npz} ({samples.shape[0]} samples) and {png}")
    finally:
        if size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _fd(args: argparse.Namespace) -> None:
    from indis.engine.generation import fd_report

    fd_report(args.samples, args.teacher, args.data, args.weights)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="indis", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="tune an INDIS predictor for a shipped digits backbone")
    f.add_argument("--backbone", choices=("unet", "dit"), default="unet")
    f.add_argument("--nfe", type=int, default=5)
    f.add_argument("--solver", default="ipndm", choices=SOLVERS)
    f.add_argument("--pool", type=int, default=None, help="average-pool the noise to pool x pool first")
    f.add_argument("--hidden", type=int, default=128)
    f.add_argument("--shift-bound", type=float, default=0.1)
    f.add_argument("--scale-bound", type=float, default=0.05)
    f.add_argument("--num-train", type=int, default=1024)
    f.add_argument("--num-val", type=int, default=512)
    f.add_argument("--steps", type=int, default=None,
                   help="optimiser steps of each stage (default: tuning.BLIND_FIT / PHI_FIT)")
    f.add_argument("--batch-size", type=int, default=None)
    f.add_argument("--lr", type=float, default=None, help="phi's learning rate (the blind stage's is "
                   "at least tuning.BLIND_FIT.lr)")
    f.add_argument("--cache", default=".indis-cache/teacher")
    f.add_argument("--out", default="phi.safetensors")
    e = sub.add_parser("eval", help="compare a predictor checkpoint with the heuristics on held-out seeds")
    e.add_argument("checkpoint")
    e.add_argument("--samples", type=int, default=512)
    e.add_argument("--cache", default=".indis-cache/teacher")
    x = sub.add_parser("export", help="export digits backbones and INDIS predictors to ONNX (and TensorRT)")
    x.add_argument("--model", action="append", default=[], choices=("unet", "dit"),
                   help="a shipped digits backbone (repeatable)")
    x.add_argument("--predictor", action="append", default=[], metavar="CKPT",
                   help="an INDIS predictor checkpoint (repeatable)")
    x.add_argument("--onnx-dir", default="onnx")
    x.add_argument("--engine-dir", default=None, help="build TensorRT engines here (where TensorRT exists)")
    x.add_argument("--force-export", action="store_true", help="re-export even if the ONNX file is current")
    x.add_argument("--force-build", action="store_true", help="rebuild engines even if cached")
    x.add_argument("--fp16", action="store_true", help="float16 ONNX and strongly typed fp16 engines")
    x.add_argument("--batch-min", type=int, default=1)
    x.add_argument("--batch-opt", type=int, default=None, help="default: min(8, --batch-max)")
    x.add_argument("--batch-max", type=int, default=64)
    x.add_argument("--timing-cache", default=None, help="TensorRT timing cache file (read and updated)")
    x.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimisation level 0-5")
    x.add_argument("--opset", type=int, default=19)
    x.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-torch check")
    g = sub.add_parser("generate", help="seeds -> samples (.npz and a PNG grid) for a shipped backbone; runs "
                       "under torchrun with the seeds split across ranks")
    g.add_argument("--backbone", default="fashion-unet",
                   choices=("fashion-unet", "digits-unet", "digits-dit"))
    g.add_argument("--nfe", type=int, default=5, help="steps of the schedule")
    g.add_argument("--solver", default="ipndm", choices=SOLVERS)
    g.add_argument("--schedule", default="edm", help="a heuristic (edm, logsnr, uniform_t, time_quadratic, "
                   "ays), gits, a grid .json (LD3-global / GITS) or an INDIS head .safetensors")
    g.add_argument("--seeds", default="0-63", help="e.g. 0-63 or 0-9,100-109")
    g.add_argument("--labels", default="seeds", help="seeds (a class per seed), none, or one class K")
    g.add_argument("--batch-size", type=int, default=64, help="seeds per chunk (the unit split across ranks)")
    g.add_argument("--weights", default=None, help="a folder of backbone weights (default: the shipped ones)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=2, help="CPU threads per process (also under torchrun: "
                   "samples are bit-identical for the same count, however the seeds are split)")
    g.add_argument("--out", required=True, help="folder for samples.npz and grid.png")
    g.add_argument("--no-progress", action="store_true")
    d = sub.add_parser("fd", help="Frechet distance of a samples .npz to the data (and to a teacher's .npz)")
    d.add_argument("samples")
    d.add_argument("--teacher", default=None, help="samples .npz of the same seeds from a teacher")
    d.add_argument("--data", default=None, help="Fashion-MNIST's IDX folder (default: the Debian package's)")
    d.add_argument("--weights", default=None, help="a folder holding the classifier (default: the shipped)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))  # generate sets its own (--threads)
    try:
        {"fit": _fit, "eval": _eval, "export": _export, "generate": _generate, "fd": _fd}[args.cmd](args)
    except USER_ERRORS as e:  # the user's to fix: one line; anything else is ours and keeps its traceback
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"indis {args.cmd}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"indis {args.cmd}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
