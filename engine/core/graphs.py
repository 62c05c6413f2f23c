"""Whole-call CUDA graphs: schedule -> coefficient table -> N denoiser calls and N fused steps, captured once.

:class:`GraphSampler` captures one sampling call per key (batch size, sample shape, dtype, device, grid
structure, condition signature) and replays it with new ``x_T``, conditions and per-sample grids -- or with
the INDIS predictor inside the graph, so the schedule map runs on the device too. Because schedules are
device tensors and the table build is free of host syncs when its structure is given
(``solvers.build_table(final_zero=, infinite_start=, check_finite=False)``), a new grid never re-captures.

Weights: a replay reads the parameters' memory, so in-place updates (``load_state_dict``, an optimiser step)
are seen without re-capture. Replacing a parameter's storage (``module.weight = ...``, ``.to()``) would leave
the graph reading freed memory: every call compares the parameters' data pointers with the ones captured
(:class:`ParameterWatch`) and re-captures when one changed. :meth:`GraphSampler.invalidate` drops every graph
explicitly.

On a non-CUDA device nothing is captured: the same body runs eagerly (``captured`` stays 0), which keeps the
code path testable without a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

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


_tree_generation = object()  # replaced whenever any module in the process registers a submodule


def _tree_changed(*_: object) -> None:
    global _tree_generation
    _tree_generation = object()


_tree_hook = None  # torch's global module-registration hook, installed by the first ParameterWatch


class ParameterWatch:
    """Whether the parameters and buffers of the ``nn.Module`` s among ``objects`` still live at the addresses
    a CUDA graph captured: a replaced storage (``module.weight = ...``, ``.to()``, ``param.data = ...``) would
    leave the graph reading freed memory. Each :meth:`moved` reads one data pointer per tensor from the
    modules' own parameter and buffer dicts, kept between calls and collected again only after some
    module registered a submodule (torch's global registration hook): no walk of the module tree per call."""

    def __init__(self, *objects: object) -> None:
        global _tree_hook
        if _tree_hook is None:
            _tree_hook = nn.modules.module.register_module_module_registration_hook(_tree_changed)
        self.modules = [m for m in objects if isinstance(m, nn.Module)]
        self._generation: object | None = None
        self._dicts: list[dict] = []
        self.addresses = self._addresses()

    def _addresses(self) -> tuple[int, ...]:
        if self._generation is not _tree_generation:
            self._generation = _tree_generation
            subs = [sub for m in self.modules for sub in m.modules()]
            self._dicts = [d for sub in subs for d in (sub._parameters, sub._buffers)]
        return tuple(t.data_ptr() for d in self._dicts for t in d.values() if t is not None)

    def moved(self) -> bool:
        """Whether any address changed since the last call (or since creation); remembers the new ones."""
        now = self._addresses()
        if now == self.addresses:
            return False
        self.addresses = now
        return True


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
                  memory: tuple | None = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """``warm()`` on a side stream, then one run of ``body`` captured as a CUDA graph (in the graph memory
    pool ``memory``, or its own) and what that run returned. The capture runs on that side stream -- never
    torch's process-wide default capture stream, which lives on whichever device captured first -- in
    ``capture_error_mode="thread_local"`` (other threads' CUDA calls do not break it), and the caller's stream
    is current again afterwards, also when the capture fails."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side), torch.no_grad():
            warm()
    finally:
        current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # The outer context restores the caller's stream even when capture_end raises inside graph.__exit__.
    with torch.cuda.stream(current), torch.no_grad():
        with torch.cuda.graph(graph, pool=memory, stream=side, capture_error_mode="thread_local"):
            out = body()
    return graph, out


@dataclass
class _Entry:
    inputs: dict[str, Tensor]            # static buffers the graph reads
    flags: tuple[bool, bool]             # (final_zero, infinite_start) of the captured grid structure
    graph: torch.cuda.CUDAGraph | None = None
    output: Tensor | None = None


class GraphSampler:
    """Sample with one CUDA-graph replay per call (see the module docstring).

    ``model``: a k-diffusion denoiser or :class:`Denoiser`. ``predictor``: an INDIS predictor run inside the
    graph (then ``sigmas`` is not passed per call); ``predictor_cond``: what the predictor reads, the dotted
    path of a ``cond`` input (e.g. ``"class_labels"``, ``"added_cond_kwargs.text_embeds"``) or a function of
    ``cond`` (e.g. ``lambda c: c["encoder_hidden_states"].mean(1)``, captured with the rest). Without a
    predictor each call passes ``sigmas`` (``[N+1]``, ``[B, N+1]`` or a :class:`Schedule`). ``warmup``:
    eager runs on a side stream before capture (compiles Triton kernels, creates library handles).
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
        self._watch = ParameterWatch(self.denoiser.net, self.predictor)

    # ------------------------------------------------------------------------------------------- public
    def __call__(self, x: Tensor, sigmas: Tensor | Schedule | None = None, *, cond: Cond | None = None,
                 uncond: Cond | None = None, guidance_scale: float | Tensor | None = None,
                 validate: bool = True) -> Tensor:
        """Sample from ``x`` (``[B, *shape]``); the first call per key captures, later calls replay."""
        inputs, flags = self._inputs(x, sigmas, cond, validate)
        inputs.update(self._guidance_inputs(x, cond, uncond, guidance_scale, validate))
        key = (tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in inputs.items()), flags)
        if self._watch.moved():
            self.invalidate()  # a parameter's storage was replaced: every graph reads stale memory
        entry = self._cache.get(key)
        if entry is None:
            entry = _Entry({k: v.clone() for k, v in inputs.items()}, flags)
            if x.is_cuda:
                self._capture(entry)  # kept only once captured: a failed capture is tried again, never
            self._cache[key] = entry  # replaced by a silent eager run
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
        """Drop every captured graph (the next call per key captures again)."""
        self._cache.clear()

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

    def _capture(self, entry: _Entry) -> None:
        entry.graph, entry.output = capture_graph(lambda: self._body(entry), entry.inputs["x"].device,
                                                  lambda: warm_up(lambda: self._body(entry), self.warmup))
        self.captured += 1
