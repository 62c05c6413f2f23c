"""Denoiser backends side by side: torch eager, torch.compile, onnxruntime (TensorRT where installed).

The project's digits UNet at batch 1, 8 and 64 with per-sample sigmas, one process, same threads for torch
and onnxruntime (``--threads``, default all cores). Reports ms per call (median of ``--reps`` after warm-up),
the ratio to torch eager and each backend's max |error| against torch eager. On CUDA (``--device cuda``) the
onnxruntime CUDA provider and a TensorRT engine are added when installed; otherwise the table says why they
were skipped (the session's actual provider is checked, not the compiled-in list).

Run:  python benchmarks/bench_export_backends.py [--device cpu] [--batches 1,8,64] [--reps 30] [--json out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from indis.engine.testbeds.digits import load_backbone
from indis.export import ExportedDenoiser, denoiser_spec, export_onnx
from indis.export.ort_backend import OrtModel


def timed(fn: Callable[[], torch.Tensor], reps: int, device: torch.device) -> list[float]:
    for _ in range(3):
        fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def backends(unet: torch.nn.Module, onnx_path: Path, device: torch.device, threads: int,
             batch_max: int) -> tuple[dict[str, Callable], list[str]]:
    import onnxruntime as ort

    found: dict[str, Callable] = {"torch eager": unet}
    skipped: list[str] = []
    t0 = time.perf_counter()
    found["torch.compile"] = torch.compile(unet)
    found["torch.compile"](torch.randn(2, 1, 8, 8, device=device), torch.ones(2, device=device))
    compile_note = f"torch.compile first call (compile) {time.perf_counter() - t0:.1f} s"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    found["onnxruntime CPU"] = ExportedDenoiser(OrtModel(onnx_path, ["CPUExecutionProvider"],
                                                         session_options=opts))
    if device.type == "cuda":
        cuda = OrtModel(onnx_path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
        if cuda.provider == "CUDAExecutionProvider":
            found["onnxruntime CUDA"] = ExportedDenoiser(cuda)
        else:
            skipped.append(f"onnxruntime CUDA: not available ({cuda.fallback or cuda.providers})")
        from indis.export.tensorrt_backend import TrtModel, build_engine, tensorrt_version

        if tensorrt_version() is None:
            skipped.append("TensorRT: not installed")
        else:
            plan = build_engine(onnx_path, onnx_path.parent / "engines", batch_max=batch_max)
            found["TensorRT"] = ExportedDenoiser(TrtModel(plan, device=device))
    return found, [compile_note, *skipped]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    unet = load_backbone("unet").to(device)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "unet.onnx"
        spec = denoiser_spec(unet.cpu(), (1, 8, 8), name="unet", batch_max=max(batches), input_std=5.0)
        export_onnx(spec, onnx_path, verify=False)
        unet.to(device)
        with torch.no_grad():
            found, notes = backends(unet, onnx_path, device, args.threads, max(batches))
            rows: dict[str, dict[int, dict]] = {name: {} for name in found}
            for b in batches:
                g = torch.Generator().manual_seed(b)
                x = (torch.randn(b, 1, 8, 8, generator=g) * 5).to(device)
                sigma = torch.exp(torch.empty(b).uniform_(-4, 4, generator=g)).to(device)
                ref = unet(x, sigma)
                for name, fn in found.items():
                    t = timed(lambda fn=fn, x=x, sigma=sigma: fn(x, sigma), args.reps, device)
                    err = float((fn(x, sigma).double() - ref.double()).abs().max())
                    rows[name][b] = {"ms_p50": statistics.median(t), "max_abs_err": err}
                    print(f"B={b} {name}: {rows[name][b]['ms_p50']:.3f} ms, max |err| {err:.1e}", flush=True)
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "threads": args.threads, "torch": torch.__version__, "python": sys.version.split()[0]}
    import onnxruntime

    env["onnxruntime"] = onnxruntime.__version__
    print(f"\n# Digits UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params), {env}\n")
    print("| backend | " + " | ".join(f"B={b} ms | vs eager" for b in batches) + " | max abs err |")
    print("|---" * (2 + 2 * len(batches)) + "|")
    for name, per in rows.items():
        cells = [f"{per[b]['ms_p50']:.3f} | {rows['torch eager'][b]['ms_p50'] / per[b]['ms_p50']:.2f}x"
                 for b in batches]
        worst = max(v["max_abs_err"] for v in per.values())
        print(f"| {name} | " + " | ".join(cells) + f" | {worst:.1e} |")
    print("\n" + "\n".join(f"- {n}" for n in notes))
    print(f"- median of {args.reps} calls after 3 warm-ups; torch and onnxruntime: {args.threads} threads")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows, "notes": notes}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
