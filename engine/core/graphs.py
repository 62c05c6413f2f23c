"""Whole-call CUDA graphs: schedule -> coefficient table -> N denoiser calls and N fused steps, captured once.

:class:`GraphSampler` captures one sampling call per key (batch size, sample shape, dtype, device, grid
structure, condition signature) and replays it with new ``x_T``, conditions and per-sample grids -- or with
the INDIS predictor inside the graph, so the schedule map runs on the device too. Because schedules are
device tensors and the table build is free of host syncs when its structure is given
(``solvers.build_table(final_zero=, infinite_start=, check_finite=False)``), a new grid never re-captures.

Weights: a replay reads the parameters' memory, so in-place updates (``load_state_dict``, an optimiser step)
are seen without re-capture. Replacing a parameter's storage (``module.weight = ...``, ``.to()``) would leave
the graph reading freed memory: every call compares the parameters' data pointers and the module tree with
those of the capture (:class:`ParameterWatch`) and re-captures when they changed. A capture that fails
(:class:`CaptureError`: the model does something a graph cannot hold, such as a host sync) is remembered per
key and raised again at once, without another capture, until :meth:`GraphSampler.invalidate` (which also
drops every graph).

On a non-CUDA device nothing is captured: the same body runs eagerly (``captured`` stays 0), which keeps the
code path testable without a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from indis.engine.core.conditions import Cond, check_batch, pick, unflatten
from indis.engine.core.families import Denoiser, as_denoiser
from indis.engine.core.guidance import check_guidance, guided_unchecked
from indis.engine.core.profiling import nvtx_range
from indis.engine.core.sampling import (
    check_finite,
    check_inputs,
    check_schedule,
    check_solver,
    check_state,
    make_plan,
    run,
    table_for,
)
from indis.engine.core.schedules import Schedule, as_grid

T = TypeVar("T")


class _Collected(NamedTuple):
    roots: tuple[int, ...]          # ids of the root modules
    modules: list[nn.Module]        # every submodule, held: no id of theirs is reused while collected
    tree: tuple[int, ...]           # ids of every submodule's children, in order


def _tree(modules: list[nn.Module]) -> tuple[int, ...]:
    return tuple(map(id, chain.from_iterable(m._modules.values() for m in modules)))


class ParameterWatch:
    """What a CUDA graph of the ``nn.Module`` s among some root objects reads, as a comparable
    :meth:`signature`: the roots, every submodule's children and every parameter's and buffer's data pointer.
    It changes when a storage moves (``module.weight = ...``, ``.to()``, ``param.data = ...``) or the module
    tree changes (a child set, replaced, inserted or deleted, a root replaced), either of which would leave a
    captured graph reading freed or stale memory. The submodules are held and collected again only when
    their children changed, so a call reads each module's three dicts instead of walking the tree. Safe to
    call from several threads (each call works on one snapshot of the collection)."""

    def __init__(self) -> None:
        self._collected: _Collected | None = None

    def signature(self, *objects: object) -> tuple:
        """The signature of the modules among ``objects`` (other objects hold nothing to watch)."""
        roots = tuple(id(m) for m in objects if isinstance(m, nn.Module))
        got = self._collected
        if got is None or got.roots != roots or _tree(got.modules) != got.tree:
            modules = list({id(sub): sub for m in objects if isinstance(m, nn.Module)
                            for sub in m.modules()}.values())
            got = self._collected = _Collected(roots, modules, _tree(modules))
        data_ptr = Tensor.data_ptr
        tensors = chain.from_iterable(d.values() for m in got.modules for d in (m._parameters, m._buffers))
        return got.roots, got.tree, tuple([data_ptr(t) for t in tensors if t is not None])


class CaptureError(RuntimeError):
    """A CUDA graph capture failed (the body did something a graph cannot hold, e.g. a host sync)."""


def warm_up(body: Callable[[], object], runs: int, reset: Callable[[], None] | None = None) -> None:
    """Run ``body`` ``runs`` times before a capture (Triton compiles, library handles are made), calling
    ``reset`` after each run -- also one that fails -- so that every run starts from the same buffers: a body
    that advances state (a batcher iteration) is never run past where it started."""
    for _ in range(runs):
        try:
            body()
        finally:
            if reset is not None:
                reset()


def capture_graph(body: Callable[[], T], device: torch.device, warm: Callable[[], None],
                  memory: tuple | None = None, stream: torch.cuda.Stream | None = None
                  ) -> tuple[torch.cuda.CUDAGraph, T]:
    """``warm()`` on ``stream`` (a new one if None), then one run of ``body`` captured there as a CUDA graph
    (in the graph memory pool ``memory``, or its own) and what that run returned. An error of ``warm()``
    propagates as it is; one of the capture raises :class:`CaptureError` from the body's own error (else
    torch's). Graphs sharing a memory pool should share a stream (the pool's blocks are reused per stream);
    after a failed capture use a new pool (some torch versions leave the failed one recording). Capture
    never uses torch's process-wide default capture stream (created on whichever device captured first),
    runs in ``capture_error_mode="thread_local"`` (CUDA calls of other threads that torch would refuse
    during a global capture do not break it), and the caller's stream is current again afterwards, also
    when the capture fails."""
    current = torch.cuda.current_stream(device)
    side = stream or torch.cuda.Stream(device=device)
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side), torch.no_grad():
            warm()
    finally:
        current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    failed: Exception | None = None  # the body's own error (torch's capture_end raises its own after it)
    try:
        # The outer context restores the caller's stream even when capture_end raises in graph.__exit__.
        with torch.cuda.stream(current), torch.no_grad():
            with torch.cuda.graph(graph, pool=memory, stream=side, capture_error_mode="thread_local"):
                try:
                    out = body()
                except Exception as e:
                    failed = e
                    raise
    except Exception as e:
        cause = failed or e
        raise CaptureError(f"CUDA graph capture failed ({type(cause).__name__}: {cause})") from cause
    return graph, out


@dataclass
class _Entry:
    inputs: dict[str, Tensor]            # static buffers the graph reads
    flags: tuple[bool, bool]             # (final_zero, infinite_start) of the captured grid structure
    signature: tuple                     # ParameterWatch.signature of the models when captured
    graph: torch.cuda.CUDAGraph | None = None
    output: Tensor | None = None


class GraphSampler:
    """Sample with one CUDA-graph replay per call (see the module docstring).

    ``model``: a k-diffusion denoiser or :class:`Denoiser`. ``predictor``: an INDIS predictor run inside the
    graph (then ``sigmas`` is not passed per call); ``predictor_cond``: what the predictor reads, the dotted
    path of a ``cond`` input (e.g. ``"class_labels"``, ``"added_cond_kwargs.text_embeds"``) or a function of
    ``cond`` (e.g. ``lambda c: c["encoder_hidden_states"].mean(1)``, captured with the rest). Without a
    predictor each call passes ``sigmas`` (``[N+1]``, ``[B, N+1]`` or a :class:`Schedule`). ``warmup``:
    eager runs on a side stream before capture, at least 1 (compiles Triton kernels, creates library handles,
    fills per-device caches such as a discrete VP family's knots: none of these can happen inside a capture).
    ``clone_output``: return a copy (the graph's output buffer is overwritten by the next replay).
    ``check_output``: raise ``FloatingPointError`` naming the samples whose output holds NaN or inf (eagerly
    also the stage where it first appears; a captured graph is checked after its replay).
    Each call's inputs pass the same checks as ``indis.sample`` (``sampling.check_inputs``) unless the call
    says ``validate=False``; with a predictor, its schedules' bounds are checked once per state dtype.

    ``cond``: a dict of tensors with the batch axis (nested dicts pass through). Classifier-free guidance:
    each call may pass ``uncond`` (same inputs; batch size 1 is shared) and ``guidance_scale`` (a float or
    ``[B]``: a new scale replays the same graph), combined as in ``indis.sample`` with this sampler's
    ``guidance_rescale`` and ``guidance_batched``.
    """

    def __init__(self, model: Callable[..., Tensor] | Denoiser, solver: str = "ipndm", *,
                 predictor: nn.Module | None = None,
                 predictor_cond: str | Callable[[Cond], Tensor] | None = None,
                 backend: str | None = None, warmup: int = 2, clone_output: bool = True,
                 check_output: bool = False, guidance_rescale: float = 0.0, guidance_batched: bool = True,
                 **solver_opts) -> None:
        check_solver(solver, solver_opts)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup={warmup!r} must be an int >= 1 (a capture needs an eager run first)")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale={guidance_rescale!r} must lie in [0, 1]")
        self.guidance_rescale, self.guidance_batched = float(guidance_rescale), guidance_batched
        self.denoiser = as_denoiser(model)
        self.solver, self.solver_opts = solver, solver_opts
        self.predictor, self.predictor_cond = predictor, predictor_cond
        self.backend, self.warmup, self.clone_output = backend, warmup, clone_output
        self.check_output = check_output
        self.captured = 0            # number of graphs captured so far (re-captures included)
        self._bounds_checked: set[torch.dtype] = set()
        self._cache: dict[tuple, _Entry] = {}
        self.failed: dict[tuple, tuple[tuple, str]] = {}  # keys whose capture failed: (signature, why)
        self._watch = ParameterWatch()

    # ------------------------------------------------------------------------------------------- public
    def __call__(self, x: Tensor, sigmas: Tensor | Schedule | None = None, *, cond: Cond | None = None,
                 uncond: Cond | None = None, guidance_scale: float | Tensor | None = None,
                 validate: bool = True) -> Tensor:
        """Sample from ``x`` (``[B, *shape]``); the first call per key captures, later calls replay."""
        inputs, flags = self._inputs(x, sigmas, cond, validate)
        inputs.update(self._guidance_inputs(x, cond, uncond, guidance_scale, validate))
        key = (tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in inputs.items()), flags)
        signature = self._watch.signature(self.denoiser, self.predictor)
        entry = self._cache.get(key)
        if entry is not None and entry.signature != signature:
            self.invalidate()  # a parameter's storage moved or the modules changed: every graph is stale
            entry = None
        failure = self.failed.get(key)
        if failure is not None and failure[0] != signature:
            self.invalidate()  # the model changed since: capture again
        elif failure is not None:
            raise CaptureError(failure[1])
        if entry is None:
            entry = _Entry({k: v.clone() for k, v in inputs.items()}, flags, signature)
            if x.is_cuda:
                self._capture(key, entry)
            self._cache[key] = entry  # kept only once captured: never replaced by a silent eager run
        else:
            for k, v in inputs.items():
                entry.inputs[k].copy_(v)
        if entry.graph is not None:
            entry.graph.replay()
            if self.check_output:
                check_finite(entry.output, "the output")
        else:
            with torch.no_grad():
                entry.output = self._body(entry, self.check_output)
        return entry.output.clone() if self.clone_output else entry.output

    def invalidate(self) -> None:
        """Drop every captured graph and every remembered capture failure (the next call per key captures
        again)."""
        self._cache.clear()
        self.failed.clear()

    @property
    def graphs(self) -> int:
        """Number of graphs currently cached."""
        return sum(e.graph is not None for e in self._cache.values())

    # ------------------------------------------------------------------------------------------ helpers
    def _guidance_inputs(self, x: Tensor, cond: Cond | None, uncond: Cond | None,
                         guidance_scale: float | Tensor | None, validate: bool) -> dict[str, Tensor]:
        """Static inputs of a guided call: ``uncond.<path>`` leaves and ``guidance_scale`` ``[B]``."""
        if uncond is None and guidance_scale is None:
            return {}
        if uncond is None or guidance_scale is None or not cond:
            raise ValueError("classifier-free guidance needs cond, uncond and guidance_scale together")
        if validate:
            check_guidance(uncond, guidance_scale, self.guidance_rescale)
        flat = check_batch(uncond, x.shape[0], x.device, "uncond", broadcast=True)
        scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=x.device).reshape(-1)
        if scale.numel() not in (1, x.shape[0]):
            raise ValueError(f"guidance_scale has {scale.numel()} values for a batch of {x.shape[0]}")
        return {**{f"uncond.{k}": v for k, v in flat.items()},
                "guidance_scale": scale.expand(x.shape[0])}

    def _inputs(self, x: Tensor, sigmas: Tensor | Schedule | None, cond: Cond | None,
                validate: bool) -> tuple[dict[str, Tensor], tuple[bool, bool]]:
        check_state(x, finite=validate)  # the shape and dtype always; the values unless the caller vouches
        inputs = {"x": x}
        for k, v in check_batch(cond, x.shape[0], x.device).items():
            inputs[f"cond.{k}"] = v
        if self.predictor is not None:
            if sigmas is not None:
                raise ValueError("this GraphSampler runs its predictor inside the graph: do not pass sigmas")
            if isinstance(self.predictor_cond, str) and f"cond.{self.predictor_cond}" not in inputs:
                raise ValueError(f"the predictor reads cond[{self.predictor_cond!r}], which this call does "
                                 f"not pass")
            sc = self.predictor.config.schedule
            if validate and x.dtype not in self._bounds_checked:
                self._check_predictor_bounds(x.dtype, x.device)
                self._bounds_checked.add(x.dtype)
            return inputs, (bool(sc.final_zero), math.isinf(sc.sigma_max))
        if sigmas is None:
            raise ValueError("pass sigmas ([N+1], [B, N+1] or a Schedule), or build the sampler with a "
                             "predictor")
        if validate:
            grid, shift, scale = check_inputs(self.denoiser, x, sigmas, self.solver,
                                              solver_opts=self.solver_opts)
        else:  # the caller vouches for the values: only shapes are arranged
            shift = scale = None
            if isinstance(sigmas, Schedule):
                sigmas, shift, scale = sigmas.grid, sigmas.shift, sigmas.scale
            grid = as_grid(sigmas, batch_size=x.shape[0], device=x.device)
        structure = torch.stack([(grid[:, -1] == 0).all(), torch.isinf(grid[:, 0]).any()])
        final_zero, infinite_start = structure.tolist()  # one sync, before the replay
        inputs["grid"] = grid.to(torch.float64)
        steps = grid.shape[-1] - 1
        for name, v in (("shift", shift), ("scale", scale)):
            if v is not None:
                v = torch.as_tensor(v, dtype=torch.float64, device=x.device)
                inputs[name] = v.expand(x.shape[0], steps)
        return inputs, (final_zero, infinite_start)

    def _check_predictor_bounds(self, dtype: torch.dtype, device: torch.device) -> None:
        """The predictor's schedules are made inside the graph, where nothing can be checked without a sync;
        but every one lies within its configuration's bounds -- a grid from sigma_max to sigma_min, shifts
        within +-shift_bound, scales within 1 +- scale_bound -- so the extremes are checked once per dtype,
        as ``indis.sample`` checks a schedule (``sampling.check_schedule``), counting sigma_min as evaluated
        whatever the solver (a predicted grid may put any step's point next to it)."""
        sc = self.predictor.config.schedule
        grid = sc.init_grid().to(device).expand(2, -1)
        bound = torch.full((2, sc.nfe), sc.shift_bound, dtype=torch.float64, device=device)
        bound[1] *= -1
        scale = torch.full_like(bound, 1 + sc.scale_bound)
        try:
            check_schedule(self.denoiser, grid, bound, scale, dtype, "heun")  # "heun": every grid point
        except ValueError as e:
            raise ValueError(f"the predictor's bounds (sigma in [{sc.sigma_min}, {sc.sigma_max}], shift "
                             f"within +-{sc.shift_bound}, scale within 1 +- {sc.scale_bound}) do not fit "
                             f"{dtype}: {e}") from e

    def _body(self, entry: _Entry, check_output: bool = False) -> Tensor:
        """Everything one call does, on the entry's static buffers: no host sync, no data-dependent branch."""
        x = entry.inputs["x"]
        cond, uncond = ({k.removeprefix(p): v for k, v in entry.inputs.items() if k.startswith(p)}
                        for p in ("cond.", "uncond."))
        cond = unflatten(cond)
        if self.predictor is not None:
            schedule = self.predictor(x, pick(self.predictor_cond, cond))
            grid, shift, scale = schedule.grid, schedule.shift, schedule.scale
        else:
            grid, shift, scale = entry.inputs["grid"], entry.inputs.get("shift"), entry.inputs.get("scale")
        final_zero, infinite_start = entry.flags
        den = self.denoiser
        if "guidance_scale" in entry.inputs:
            den = guided_unchecked(den, unflatten(uncond), entry.inputs["guidance_scale"],
                                   self.guidance_rescale, self.guidance_batched)
        with nvtx_range("coefficients"):  # no checks in the graph: _inputs checked the inputs on the host
            table = table_for(den, grid, self.solver, x.dtype, shift=shift, scale=scale, check=False,
                              final_zero=final_zero, infinite_start=infinite_start, **self.solver_opts)
            plan = make_plan(den, table, x)
        return run(plan, x, cond, backend=self.backend, check_output=check_output)

    def _capture(self, key: tuple, entry: _Entry) -> None:
        def warm() -> None:  # the signature the graph holds is the one after the warm-up (which may
            warm_up(lambda: self._body(entry), self.warmup)  # register a model's lazy buffers)
            entry.signature = self._watch.signature(self.denoiser, self.predictor)

        try:
            entry.graph, entry.output = capture_graph(lambda: self._body(entry), entry.inputs["x"].device,
                                                      warm)
            if self._watch.signature(self.denoiser, self.predictor) != entry.signature:
                entry.graph = entry.output = None
                raise CaptureError("the model moved its parameters or changed its modules while it ran (e.g. "
                                   "CPU offload hooks): the graph would read memory it does not own")
        except CaptureError as e:
            if not isinstance(e.__cause__, torch.OutOfMemoryError):  # out of memory may pass: try again
                why = (f"{e}; a model that cannot be captured runs eagerly with indis.sample (or "
                       "graphs=False in the pipeline runner)")
                self.failed[key] = (entry.signature, why)
                raise CaptureError(self.failed[key][1]) from e.__cause__
            raise
        self.captured += 1
