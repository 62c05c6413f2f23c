"""Multi-process tuning: DDP over two gloo ranks (each unrolling its share of every global batch) matches one
process on the whole batch -- for the gradients of one step and for the head after a short ``fit``, with and
without the full-batch L-BFGS finish. (Seed -> noise regeneration in another process: test_teacher.py.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from indis.engine.core.predictor import Predictor, PredictorConfig, ScheduleConfig
from indis.engine.testbeds.mixtures import GaussianMixture
from indis.engine.tuning.fit import FitConfig, fit, sample_loss, unroll
from indis.engine.tuning.teacher import TuningData, initial_state, noise_from_seeds
from tests.helpers import subprocess_env as _env

SHAPE = (4,)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
WORLD = 2
TIMEOUT = 180
LBFGS_STEPS = 4


# ------------------------------------------------------------------------------------- shared set-up
def _model() -> GaussianMixture:
    gen = torch.Generator().manual_seed(7)
    means = 2.0 * torch.randn(3, SHAPE[0], generator=gen, dtype=torch.float64)
    return GaussianMixture(means, torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64))


def _head() -> Predictor:
    sc = ScheduleConfig(nfe=3, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    torch.manual_seed(0)  # the linear layers' default init
    head = Predictor(PredictorConfig(sc, "euler", SHAPE, hidden=16)).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the residual off zero so x_T (and every layer) matters
        head.out.weight.copy_(0.3 * torch.randn(head.out.weight.shape, generator=gen, dtype=torch.float64))
    return head


def _data(seeds: range) -> TuningData:
    ids = torch.arange(seeds.start, seeds.stop)
    x_T = initial_state(noise_from_seeds(ids, SHAPE, dtype=torch.float64), SIGMA_MAX)
    x0 = noise_from_seeds(ids + 10_000, SHAPE, dtype=torch.float64)  # any fixed targets
    return TuningData(ids, x_T, None, x0)


def _step_grads(head: torch.nn.Module, module: torch.nn.Module, data: TuningData) -> dict[str, torch.Tensor]:
    loss = sample_loss(unroll(module, _model(), data.x_T, None, "euler"), data.x0, "l2").mean()
    loss.backward()
    return {k: p.grad.detach().clone() for k, p in head.named_parameters()}


def _fit_state(train: TuningData, lbfgs_steps: int = 0) -> dict[str, torch.Tensor]:
    head = _head()
    cfg = FitConfig(steps=3, batch_size=8, lr=1e-2, progress=False, val_every=100,
                    keep="last" if lbfgs_steps else "best", lbfgs_steps=lbfgs_steps)
    fit(head, _model(), train, None, "euler", cfg)
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def _worker(rank: int, world: int, store: str, out: str) -> None:
    """One gloo rank: DDP gradients on its share of the 8-sample batch, then a short ``fit``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        head = _head()
        ddp = torch.nn.parallel.DistributedDataParallel(head)
        grads = _step_grads(head, ddp, _data(range(0, 8)).subset(torch.arange(rank, 8, world)))
        state = _fit_state(_data(range(0, 16)))
        lbfgs = _fit_state(_data(range(0, 16)), lbfgs_steps=LBFGS_STEPS)
        torch.save({"grads": grads, "state": state, "lbfgs": lbfgs}, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    tmp = tmp_path_factory.mktemp("ddp")
    store, out = tmp / "store", tmp / "result"
    script = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("_tuning_distributed", {str(Path(__file__))!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod._worker(int(sys.argv[1]), {WORLD}, {str(store)!r}, {str(out)!r})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed (rc {p.returncode}):\n{log[-4000:]}"
    return [torch.load(f"{out}.rank{r}") for r in range(WORLD)]


def test_ddp_gradients_match_one_process_on_the_union_batch(ddp_results: list[dict]) -> None:
    head = _head()
    ref = _step_grads(head, head, _data(range(0, 8)))
    assert set(ref) == {"base", "x_in.weight", "x_in.bias", "trunk.1.weight", "trunk.1.bias", "out.weight"}
    for name, g in ref.items():
        assert g.dtype == torch.float64
        assert g.abs().max() > 0, f"{name}: zero gradient makes the comparison vacuous"
        for r, res in enumerate(ddp_results):
            assert _rel(res["grads"][name], g) < 1e-6, f"rank {r}, {name}: {_rel(res['grads'][name], g):.3g}"
    # the two ranks' halves alone differ from the union (so DDP's averaging is what makes them agree)
    half = _head()
    g0 = _step_grads(half, half, _data(range(0, 8)).subset(torch.arange(0, 8, WORLD)))
    assert _rel(g0["out.weight"], ref["out.weight"]) > 1e-3


def test_ddp_fit_matches_one_process(ddp_results: list[dict]) -> None:
    ref = _fit_state(_data(range(0, 16)))
    init = _head().state_dict()
    assert any(_rel(ref[k], init[k]) > 1e-4 for k in ref), "fit did not move the head"
    for r, res in enumerate(ddp_results):
        assert set(res["state"]) == set(ref)
        for k, v in ref.items():
            assert _rel(res["state"][k], v) < 1e-6, f"rank {r}, {k}: {_rel(res['state'][k], v):.3g}"


def test_ddp_lbfgs_finish_matches_one_process(ddp_results: list[dict]) -> None:
    ref = _fit_state(_data(range(0, 16)), lbfgs_steps=LBFGS_STEPS)
    adam_only = _fit_state(_data(range(0, 16)))
    assert any(_rel(ref[k], adam_only[k]) > 1e-4 for k in ref), "the L-BFGS finish did not move the head"
    for r, res in enumerate(ddp_results):
        for k, v in ref.items():
            assert _rel(res["lbfgs"][k], v) < 1e-6, f"rank {r}, {k}: {_rel(res['lbfgs'][k], v):.3g}"
