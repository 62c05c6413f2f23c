"""Continuous batching: batch invariance over mixed solvers/NFE/grids, failures, cancels, property tests."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import indis
from indis.engine.serving.admission import Admission
from indis.engine.serving.allocation import NFEChooser
from indis.engine.serving.batcher import ContinuousBatcher, Request
from indis.engine.serving.pool import SlotPool
from indis.engine.studies.convergence import small_mixture
from indis.engine.tuning.teacher import noise_from_seeds
from tests.helpers import KERNEL_DEVICE

SOLVERS = ["ipndm", "unipc", "dpmpp_2m", "heun", "euler", "dpmpp_3m", "ipndm_v"]
MODEL = small_mixture()


def _labelled(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
    """The mixture's denoiser plus a per-sample offset from the class label (-1 = none)."""
    return MODEL(x, sigma) + 0.01 * class_labels.clamp(min=0).to(x.dtype).view(-1, 1)


def _request(i: int) -> Request:
    solver = SOLVERS[i % len(SOLVERS)]
    nfe = [3, 5, 7][i % 3] + (1 if solver == "heun" and i % 2 else 0)
    return Request(seed=i, nfe=nfe, solver=solver, schedule=["edm", "logsnr", "time_quadratic"][i % 3],
                   cond={"class_labels": i % 11 - 1})


def _alone(req: Request, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    x = noise_from_seeds([req.seed], (6,), dtype=dtype) * 80.0
    sched = req.schedule if not isinstance(req.schedule, str) else indis.get_sigmas(req.schedule, req.nfe,
                                                                                    0.002, 80.0)
    cond = {"class_labels": torch.tensor([(req.cond or {}).get("class_labels", -1)])}
    return indis.sample(_labelled, x, sched, req.solver, cond=cond, **req.solver_opts)[0]


def _batcher(**kw) -> ContinuousBatcher:
    kw.setdefault("dtype", torch.float64)
    return ContinuousBatcher(_labelled, (6,), conditions={"class_labels": (-1, 10)}, **kw)


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_mixed_stream_equals_each_request_alone(policy: str) -> None:
    reqs = [_request(i) for i in range(30)]
    grid = indis.grid_from_logits(torch.randn(1, 6, generator=torch.Generator().manual_seed(0),
                                              dtype=torch.float64), 0.002, 80.0)[0]
    reqs.append(Request(seed=99, nfe=5, solver="unipc", schedule=indis.Schedule(grid, 0.05 * torch.ones(5),
                                                                                1.01 * torch.ones(5)),
                        solver_opts={"order": 3}))
    b = _batcher(capacity=8, policy=policy)
    out = b.run_all(reqs)
    for r, o in zip(reqs, out, strict=True):
        torch.testing.assert_close(o, _alone(r), rtol=1e-10, atol=1e-10)
    assert b.stats["completed"] == len(reqs) and not b.live and not b.waiting
    if policy == "continuous":
        assert b.stats["padded_steps"] < 1.3 * b.stats["slot_steps"]  # little compute wasted on padding


def test_predictor_schedules_and_buckets() -> None:
    cfg = indis.PredictorConfig(indis.ScheduleConfig(nfe=4, sigma_min=0.002, sigma_max=80.0), "ipndm", (6,))
    phi = indis.Predictor(cfg)
    torch.nn.init.normal_(phi.out.weight, std=0.05)
    seen = []

    def model(x, sigma, class_labels):
        seen.append(x.shape[0])
        return _labelled(x, sigma, class_labels)

    b = ContinuousBatcher(model, (6,), capacity=12, buckets=(4, 12), predictors={(4, "ipndm"): phi},
                          conditions={"class_labels": (-1, 10)}, dtype=torch.float64)
    reqs = [Request(seed=i, nfe=4, schedule="predictor") for i in range(7)]
    out = b.run_all(reqs)
    for r, o in zip(reqs, out, strict=True):
        x = noise_from_seeds([r.seed], (6,), dtype=torch.float64) * 80.0
        with torch.no_grad():
            ref = indis.sample(_labelled, x, phi(x.float()), "ipndm",
                               cond={"class_labels": torch.tensor([-1])})
        torch.testing.assert_close(o, ref[0], rtol=1e-6, atol=1e-6)
    assert set(seen) <= {4, 12}


def test_bad_requests_fail_alone() -> None:
    bad = [Request(x_T=torch.zeros(5), nfe=3), Request(x_T=torch.full((6,), float("nan")), nfe=3),
           Request(seed=1, x_T=torch.zeros(6)), Request(seed=1, schedule="karras"),
           Request(seed=1, nfe=3, schedule=torch.tensor([80.0, 1.0, 0.5])),
           Request(seed=1, nfe=2, schedule=torch.tensor([80.0, 90.0, 0.5])),
           Request(seed=1, cond={"class_labels": 10}), Request(seed=1, cond={"style": 1}),
           Request(seed=1, schedule="predictor"),
           Request(seed=1, nfe=3, solver="ipndm", solver_opts={"order": 4}),
           Request(seed=1, nfe=12, solver="heun"), Request(seed=1, schedule=None),
           Request(seed=1, schedule=object()), Request(seed=1, cond=[1]), Request(seed=-1),
           Request(seed=2**64), Request(seed=True), Request(seed=1.0), object(),
           Request(seed=1, solver="dpm_fast"), Request(seed=1, solver_opts={"frobnicate": 1}),
           Request(x_T=torch.full((6,), 1e39, dtype=torch.float64), nfe=3),  # inf in the float32 pool
           Request(seed=1, nfe=2, schedule=indis.Schedule(torch.tensor([80.0, 1.0, 0.5]), None,
                                                          torch.tensor([1.0, -1.0]))),
           Request(seed=1, nfe=2, schedule=indis.Schedule(torch.tensor([80.0, 1.0, 0.5]),
                                                          torch.tensor([1000.0, 0.0]), None))]
    good = [_request(i) for i in range(6)] + [Request(seed=7, nfe=3, cond=None)]
    b = _batcher(capacity=4, dtype=torch.float32)
    futures = [b.submit(r) for r in bad + good]
    while b.pending():
        b.iterate(flush=True)
    for f in futures[:len(bad)]:
        assert isinstance(f.exception(), ValueError), f.exception()
    for r, f in zip(good, futures[len(bad):], strict=True):
        torch.testing.assert_close(f.result(), _alone(r, torch.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2)])
def test_schedules_with_and_without_shift_or_scale_are_never_mixed_up(order: tuple[int, ...]) -> None:
    grid = indis.get_sigmas("edm", 5, 0.002, 80.0)
    ones = torch.ones(5, dtype=torch.float64)
    schedules = [indis.Schedule(grid, None, None), indis.Schedule(grid, None, 0.9 * ones),
                 indis.Schedule(grid, 0.05 * ones, None), indis.Schedule(grid, 0.05 * ones, 0.9 * ones)]
    reqs = [Request(seed=1, nfe=5, schedule=schedules[i]) for i in order]
    for r, out in zip(reqs, _batcher(capacity=8).run_all(reqs), strict=True):
        torch.testing.assert_close(out, _alone(r), rtol=1e-10, atol=1e-10)


def test_heuristic_schedules_pass_the_same_checks_before_any_model_call() -> None:
    calls = []

    def counted(x, sigma, class_labels):
        calls.append(1)
        return _labelled(x, sigma, class_labels)

    b = ContinuousBatcher(counted, (6,), conditions={"class_labels": (-1, 10)}, dtype=torch.float16,
                          sigma_min=1e-9, sigma_max=1e5)
    futures = [b.submit(Request(seed=1, nfe=3, solver="heun")),
               b.submit(Request(x_T=torch.zeros(6), nfe=3, solver="heun"))]
    while b.pending():
        b.iterate(flush=True)
    assert "x_T (seed 1 at sigma_max 100000.0) contains NaN or inf" in str(futures[0].exception())
    assert "rounds to 0" in str(futures[1].exception()) and not calls


def test_bad_batcher_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="floating-point dtype"):
        _batcher(dtype=torch.int64)
    with pytest.raises(ValueError, match="backend='cuda'"):
        _batcher(backend="cuda")


def test_a_non_finite_result_is_never_delivered() -> None:
    def nan_for_label_3(x, sigma, class_labels):
        out = _labelled(x, sigma, class_labels)
        return torch.where((class_labels == 3).view(-1, 1), torch.full_like(out, float("nan")), out)

    b = ContinuousBatcher(nan_for_label_3, (6,), conditions={"class_labels": (-1, 10)}, capacity=4,
                          dtype=torch.float64)
    reqs = [Request(seed=i, nfe=3, cond={"class_labels": i % 5}) for i in range(10)]
    futures = [b.submit(r) for r in reqs]
    while b.pending():
        b.iterate(flush=True)
    for r, f in zip(reqs, futures, strict=True):
        if r.cond["class_labels"] == 3:
            assert isinstance(f.exception(), FloatingPointError), f.exception()
        else:
            torch.testing.assert_close(f.result(), _alone(r), rtol=1e-10, atol=1e-10)
    assert b.stats["failed"] == 2 and b.stats["completed"] == 8


def test_a_vp_model_served_by_seed_starts_where_the_teacher_does() -> None:
    from indis.engine.core.families import Denoiser, VPLinear
    from indis.engine.tuning.teacher import initial_state

    fam = VPLinear()
    den = Denoiser(lambda x, t: 0.1 * x, fam, "eps", "t", time_scale=999.0)
    smax = float(fam.sigma_range[1])
    b = ContinuousBatcher(den, (6,), capacity=4, sigma_max=smax, dtype=torch.float64)
    out = b.run_all([Request(seed=s, nfe=4, solver="dpmpp_2m") for s in range(3)])
    for s, o in enumerate(out):
        x_T = initial_state(noise_from_seeds([s], (6,), dtype=torch.float64), smax, fam)
        ref = indis.sample(den, x_T, indis.get_sigmas("edm", 4, 0.002, smax, family=fam), "dpmpp_2m")[0]
        torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)
        assert float(x_T.abs().max()) < 6  # the VP start is unit-scale noise, not sigma_max times it


def test_denoiser_failure_fails_that_call_only() -> None:
    calls = {"n": 0}

    def flaky(x, sigma, class_labels):
        calls["n"] += 1
        if calls["n"] in (3, 9):
            raise RuntimeError("injected")
        return _labelled(x, sigma, class_labels)

    b = ContinuousBatcher(flaky, (6,), capacity=4, conditions={"class_labels": (-1, 10)}, dtype=torch.float64)
    reqs = [_request(i) for i in range(20)]
    futures = [b.submit(r) for r in reqs]
    while b.pending():
        b.iterate(flush=True)
    failed = [f for f in futures if f.exception() is not None]
    assert failed and all("injected" in str(f.exception()) for f in failed)
    assert b.stats["completed"] + b.stats["failed"] == len(reqs) == len(failed) + b.stats["completed"]
    for r, f in zip(reqs, futures, strict=True):
        if f.exception() is None:
            torch.testing.assert_close(f.result(), _alone(r), rtol=1e-10, atol=1e-10)


def test_cancel_waiting_and_in_flight() -> None:
    b = _batcher(capacity=3)
    reqs = [_request(i) for i in range(9)]
    futures = [b.submit(r) for r in reqs]
    b.iterate()                        # 3 in flight
    assert futures[1].cancel() and futures[7].cancel()
    b.iterate()                        # the in-flight cancel frees its slot at once, not when it would finish
    assert b.stats["cancelled"] == 1 and all(fut is not futures[1] for fut in b.live)
    while b.pending():
        b.iterate(flush=True)
    assert futures[1].cancelled() and futures[7].cancelled()
    for i, f in enumerate(futures):
        if i not in (1, 7):
            torch.testing.assert_close(f.result(), _alone(reqs[i]), rtol=1e-10, atol=1e-10)
    assert b.stats["cancelled"] == 2 and not b.live


def test_failed_placement_fails_those_requests_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error while writing admitted requests into the pool (e.g. out of memory) fails them, frees the
    slots and the server goes on."""
    b = _batcher(capacity=4)
    reqs = [_request(i) for i in range(10)]
    futures = [b.submit(r) for r in reqs]
    b.iterate()
    real, calls = ContinuousBatcher._place, {"n": 0}

    def flaky(self, ready):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return real(self, ready)

    monkeypatch.setattr(ContinuousBatcher, "_place", flaky)
    while b.pending():
        b.iterate(flush=True)
    failed = [f for f in futures if f.exception() is not None]
    assert failed and all("admission failed: RuntimeError: injected" in str(f.exception()) for f in failed)
    assert b.stats["failed"] == len(failed) and b.stats["completed"] == len(reqs) - len(failed)
    for r, f in zip(reqs, futures, strict=True):
        if f.exception() is None:
            torch.testing.assert_close(f.result(), _alone(r), rtol=1e-10, atol=1e-10)
    assert not b.live and (b.pool.step == -1).all()


def test_auto_nfe_requests_take_the_choosers_nfe() -> None:
    """nfe='auto': the chooser picks each NFE from x_T and the label at admission (recorded on the future);
    the sample equals running the request alone at that NFE; without a chooser the request fails alone."""
    def scores(x_T: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:  # energy and label matter
        hard = x_T.flatten(1).pow(2).mean(1, keepdim=True) / 6400 + 0.1 * labels.clamp(min=0)[:, None]
        return hard * torch.tensor([1.0, 0.4, 0.1], dtype=torch.float64)

    calibration = scores(torch.randn(256, 6, dtype=torch.float64) * 80, torch.arange(256) % 10)
    chooser = NFEChooser(scores, (3, 5, 7), 5.0, calibration)
    b = _batcher(capacity=4, chooser=chooser, predictor_cond="class_labels")
    reqs = [Request(seed=i, nfe="auto", solver="ipndm", cond={"class_labels": i % 10}) for i in range(24)]
    futures = [b.submit(r) for r in reqs]
    no_chooser = _batcher(capacity=4)
    bare = no_chooser.submit(Request(seed=1, nfe="auto"))
    no_chooser.iterate(flush=True)
    while b.pending():
        b.iterate(flush=True)
    nfes = [f.nfe for f in futures]
    assert set(nfes) <= {3, 5, 7} and len(set(nfes)) > 1
    for r, f in zip(reqs, futures, strict=True):
        torch.testing.assert_close(f.result(), _alone(Request(seed=r.seed, nfe=f.nfe, cond=r.cond)),
                                   rtol=1e-10, atol=1e-10)
    assert isinstance(bare.exception(timeout=0), ValueError) and "chooser" in str(bare.exception(timeout=0))


def test_background_thread_front_and_bounded_queue() -> None:
    b = _batcher(capacity=4, max_waiting=50)
    b.start()
    results: dict[int, torch.Tensor] = {}

    def client(lo: int) -> None:
        for i in range(lo, lo + 8):
            results[i] = b.submit(_request(i)).result(timeout=60)

    threads = [threading.Thread(target=client, args=(k * 8,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.close(timeout=60)
    assert sorted(results) == list(range(24))
    for i, r in results.items():
        torch.testing.assert_close(r, _alone(_request(i)), rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(_request(0))
    full = _batcher(capacity=2, max_waiting=3)
    futures = [full.submit(_request(i)) for i in range(5)]
    assert "queue full" in str(futures[4].exception())


def test_a_cancel_at_any_stage_of_admission_never_stops_the_loop() -> None:
    """A future cancelled while its request is validated, its table built or its slot written: the loop goes
    on and every other request is served (a cancelled future's set_exception raises InvalidStateError)."""
    futures: dict[int, object] = {}

    def cancelling_phi(x_T: torch.Tensor, c: torch.Tensor | None) -> indis.Schedule:
        futures[0].cancel()  # the request's own future, cancelled while the request is validated
        raise RuntimeError("injected while validating")

    b = _batcher(capacity=4, predictors={(5, "ipndm"): cancelling_phi})
    futures[0] = b.submit(Request(seed=0, nfe=5, schedule="predictor"))
    rest = [b.submit(_request(i)) for i in range(1, 9)]
    b.start()
    for i, f in enumerate(rest, start=1):
        torch.testing.assert_close(f.result(timeout=60), _alone(_request(i)), rtol=1e-10, atol=1e-10)
    b.close(timeout=60)
    assert futures[0].cancelled() and not b._thread.is_alive()


STAGES = {"_drop_cancelled": ContinuousBatcher, "_admit": ContinuousBatcher, "prepare": Admission,
          "group_table": Admission, "_place": ContinuousBatcher, "place": SlotPool, "raw": SlotPool,
          "step_slots": SlotPool, "_release": ContinuousBatcher, "remove": SlotPool}


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_exception_in_any_stage_fails_its_requests_not_the_loop(stage: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault injected once in a stage of the loop (cancel scan, admission, validation, table, placement,
    denoiser call, step, retirement, compaction): the requests involved fail with it, the later ones are
    served."""
    owner = STAGES[stage]
    real, calls = getattr(owner, stage), {"n": 0}

    def faulty(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError(f"injected in {stage}")
        return real(self, *a, **kw)

    b = _batcher(capacity=3)
    monkeypatch.setattr(owner, stage, faulty)
    b.start()
    first = [b.submit(_request(i)) for i in range(6)]
    for i, f in enumerate(first):
        if f.exception(timeout=60) is None:
            torch.testing.assert_close(f.result(), _alone(_request(i)), rtol=1e-10, atol=1e-10)
        else:
            assert "injected" in str(f.exception())
    assert calls["n"] >= 2  # the fault did fire
    monkeypatch.setattr(owner, stage, real)
    later = [b.submit(_request(i)) for i in range(6, 9)]
    for i, f in enumerate(later, start=6):
        torch.testing.assert_close(f.result(timeout=60), _alone(_request(i)), rtol=1e-10, atol=1e-10)
    b.close(timeout=60)
    assert not b._thread.is_alive() and not b.live


def test_run_all_fails_the_pool_on_a_fault_and_serves_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = ContinuousBatcher._release, {"n": 0}

    def faulty(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected in _release")
        return real(self, *a, **kw)

    monkeypatch.setattr(ContinuousBatcher, "_release", faulty)
    b = _batcher(capacity=3)
    reqs = [_request(i) for i in range(7)]
    with pytest.raises(RuntimeError, match="batcher iteration failed: RuntimeError: injected"):
        b.run_all(reqs)  # raises the first failure, after everything else finished
    assert not b.pending() and calls["n"] >= 2


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message")


def test_an_exception_that_cannot_be_printed_fails_its_request_alone() -> None:
    def phi(x_T: torch.Tensor, c: torch.Tensor | None) -> indis.Schedule:
        raise _Unprintable()

    b = _batcher(capacity=4, predictors={(5, "ipndm"): phi})
    futures = [b.submit(Request(seed=0, nfe=5, schedule="predictor")), b.submit(_request(1)),
               b.submit(_request(2))]
    while b.pending():
        b.iterate(flush=True)
    assert "_Unprintable" in str(futures[0].exception())
    for i, f in zip((1, 2), futures[1:], strict=True):
        torch.testing.assert_close(f.result(), _alone(_request(i)), rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop re-raises
def test_a_stopped_loop_fails_every_request_and_refuses_new_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    def fatal(self, flush):
        raise KeyboardInterrupt  # not an iteration's fault: the loop stops

    b = _batcher(capacity=2)
    futures = [b.submit(_request(i)) for i in range(4)]
    monkeypatch.setattr(ContinuousBatcher, "_guarded_iterate", fatal)
    b.start()
    b._thread.join(timeout=60)
    for f in futures:
        assert "batcher loop stopped: KeyboardInterrupt" in str(f.exception(timeout=0))
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(_request(5))


def test_numerically_equal_options_of_other_types_are_not_merged() -> None:
    """``order=2`` and ``order=2.0`` hash alike; a merged group would fail the valid one."""
    grid = indis.get_sigmas("edm", 5, 0.002, 80.0)
    good = Request(seed=1, nfe=5, schedule=grid, solver="unipc", solver_opts={"order": 2})
    odd = Request(seed=2, nfe=5, schedule=grid, solver="unipc", solver_opts={"order": 2.0})
    b = _batcher(capacity=4)
    futures = [b.submit(odd), b.submit(good)]
    while b.pending():
        b.iterate(flush=True)
    torch.testing.assert_close(futures[1].result(), _alone(good), rtol=1e-10, atol=1e-10)


def test_a_filling_static_batch_does_not_spin(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    real, calls = ContinuousBatcher._admit, {"n": 0}

    def counted(self, flush):
        calls["n"] += 1
        return real(self, flush)

    monkeypatch.setattr(ContinuousBatcher, "_admit", counted)
    b = _batcher(capacity=4, policy="static")
    b.start()
    f = b.submit(_request(0))  # one request waiting for a batch of 4
    time.sleep(0.3)
    assert calls["n"] < 10
    b.close(timeout=60)  # closing flushes the partial batch
    torch.testing.assert_close(f.result(timeout=60), _alone(_request(0)), rtol=1e-10, atol=1e-10)


def test_list_valued_solver_options_are_served() -> None:
    """``solver_opts={"disable_corrector": [1]}`` (a list, as documented) used to kill the loop unhashed."""
    grid = indis.get_sigmas("edm", 5, 0.002, 80.0)
    req = Request(seed=1, nfe=5, schedule=grid, solver="unipc", solver_opts={"disable_corrector": [1]})
    bad = Request(seed=2, nfe=5, solver="unipc", solver_opts={"disable_corrector": {1: 2}})
    b = _batcher(capacity=2)
    futures = [b.submit(req), b.submit(bad)]
    while b.pending():
        b.iterate(flush=True)
    torch.testing.assert_close(futures[0].result(), _alone(req), rtol=1e-10, atol=1e-10)
    assert isinstance(futures[1].exception(), ValueError)


def test_an_nfe_beyond_the_pool_fails_before_any_table_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    real = Admission.table
    monkeypatch.setattr(Admission, "table", lambda self, *a: built.append(a) or real(self, *a)
                        if a[2].shape[-1] <= 17 else pytest.fail("a table was built for a refused NFE"))
    b = _batcher(capacity=8, max_stages=16)
    futures = [b.submit(Request(seed=1, nfe=n)) for n in (10**6, 17, 0, -3, True, 2.5, "5")]
    b.iterate(flush=True)
    for f in futures:
        assert isinstance(f.exception(timeout=0), ValueError) and "max_stages" in str(f.exception())
    assert not built and not b.pending()


def test_one_loop_per_batcher() -> None:
    b = _batcher(capacity=2)
    b.start()
    with pytest.raises(RuntimeError, match="already driven"):
        b.start()
    with pytest.raises(RuntimeError, match="already driven"):
        b.run_all([_request(0)])
    with pytest.raises(RuntimeError, match="already driven"):
        b.iterate()
    f = b.submit(_request(1))
    torch.testing.assert_close(f.result(timeout=60), _alone(_request(1)), rtol=1e-10, atol=1e-10)
    b.close(timeout=60)
    assert not b._thread.is_alive()
    again = _batcher(capacity=2)
    assert len(again.run_all([_request(2)])) == 1
    again.start()  # after run_all returned, a loop may start
    again.close(timeout=60)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.booleans()), min_size=1, max_size=25),
       st.integers(1, 5))
def test_random_arrivals_cancels_and_failures(events, capacity) -> None:
    """Each event: submit k requests, maybe cancel the oldest unfinished one, maybe make the next call fail.
    Every future ends exactly once; nothing is stuck; the pool never exceeds its capacity."""
    fail_next = {"on": False}

    def model(x, sigma, class_labels):
        if fail_next["on"]:
            fail_next["on"] = False
            raise RuntimeError("injected")
        return _labelled(x, sigma, class_labels)

    b = ContinuousBatcher(model, (6,), capacity=capacity, conditions={"class_labels": (-1, 10)},
                          dtype=torch.float64)
    futures, ends = [], []
    for k, cancel, fail in events:
        for _ in range(k):
            i = len(futures)
            f = b.submit(_request(i))
            f.add_done_callback(lambda f, i=i: ends.append(i))
            futures.append(f)
        if cancel:
            open_ = [f for f in futures if not f.done()]
            if open_:
                open_[0].cancel()
        fail_next["on"] = fail
        b.iterate()
        assert len(b.live) <= capacity
    while b.pending():
        b.iterate(flush=True)
    assert all(f.done() for f in futures)
    assert sorted(ends) == list(range(len(futures)))  # each future finished exactly once
    for i, f in enumerate(futures):
        if not f.cancelled() and f.exception() is None:
            torch.testing.assert_close(f.result(), _alone(_request(i)), rtol=1e-10, atol=1e-10)


def test_triton_kernel_serves_the_pool() -> None:
    reqs = [_request(i) for i in range(10)]
    dev = KERNEL_DEVICE
    model = small_mixture().to(dev)

    def labelled(x, s, class_labels):
        return model(x, s) + 0.01 * class_labels.clamp(min=0).to(x.dtype).view(-1, 1)

    b = ContinuousBatcher(labelled, (6,), capacity=4, conditions={"class_labels": (-1, 10)}, device=dev,
                          backend="triton")
    out = b.run_all(reqs)
    for r, o in zip(reqs, out, strict=True):
        torch.testing.assert_close(o.cpu().double(), _alone(r), rtol=1e-4, atol=1e-3)


def test_native_and_python_paths_agree_exactly() -> None:
    """The C++ step and the torch reference give bit-identical pools (float32), so a machine without a
    compiler serves the same samples."""
    from indis.kernels import native

    if not native.available():
        pytest.skip(native.REASON)
    reqs = [_request(i) for i in range(24)]
    outs = [ContinuousBatcher(_labelled, (6,), capacity=6, conditions={"class_labels": (-1, 10)},
                              backend=backend).run_all(reqs) for backend in ("native", "torch")]
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("driver", ["run_all", "iterate", "start"])
@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_a_model_with_trainable_parameters_is_served_without_a_graph(backend: str, driver: str) -> None:
    """Serving never differentiates, whichever loop drives it (grad mode on in the caller's thread): with
    parameters that require grad the results carry no graph and the pool's buffers hold none (a graph on
    them would grow with every iteration)."""
    from indis.kernels import native
    from indis.kernels.ragged_step import triton

    if (backend == "native" and not native.available()) or (backend == "triton" and triton is None):
        pytest.skip(f"{backend} is not available here")

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

        def forward(self, x, sigma):
            return self.w * x / (1 + sigma.view(-1, 1) ** 2)

    b = ContinuousBatcher(Scaled(), (6,), capacity=4, dtype=torch.float64, backend=backend)
    requests = [Request(seed=i, nfe=3) for i in range(5)]
    assert torch.is_grad_enabled()
    if driver == "run_all":
        out = b.run_all(requests)
    else:
        futures = [b.submit(r) for r in requests]
        if driver == "iterate":
            while b.pending():
                b.iterate(flush=True)
        else:
            b.start()
            b.close(timeout=60)
        out = [f.result(timeout=60) for f in futures]
    assert torch.is_grad_enabled()  # the caller's grad mode is left as it was
    assert all(y.grad_fn is None and not y.requires_grad for y in out)
    assert b.pool.y.grad_fn is None and not b.pool.y.requires_grad


def test_text_conditions_and_per_request_guidance_equal_each_request_alone() -> None:
    """A tiny diffusers text UNet served with classifier-free guidance: each request brings its own text
    embedding, negative prompt and guidance scale (and NFE); the stream equals each request sampled alone."""
    diffusers = pytest.importorskip("diffusers")
    from indis.engine.testbeds.tiny_diffusers import TEXT, text_unet

    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                  beta_end=0.012)
    den = indis.from_diffusers(text_unet(), sched)
    grids = {n: indis.grid_from_scheduler(sched, n) for n in (3, 5)}
    g = torch.Generator().manual_seed(2)
    reqs = [Request(seed=i, nfe=[3, 5][i % 2], solver="dpmpp_2m", schedule=grids[[3, 5][i % 2]],
                    cond={TEXT: torch.randn(5, 12, generator=g)},
                    uncond={TEXT: torch.zeros(5, 12) if i % 3 else torch.randn(1, 5, 12, generator=g)},
                    guidance_scale=[1.0, 4.0, 7.5][i % 3]) for i in range(7)]
    sigma_max = float(grids[3][0])
    b = ContinuousBatcher(den, (4, 8, 8), capacity=4, sigma_max=sigma_max,
                          conditions={TEXT: indis.TensorCondition((5, 12))}, guidance=True)
    with torch.no_grad():
        out = b.run_all(reqs)
        for r, o in zip(reqs, out, strict=True):
            x = indis.noise_from_seeds([r.seed], (4, 8, 8)) * float(den.family.s(torch.tensor(sigma_max)))
            alone = indis.sample(den, x, r.schedule, "dpmpp_2m", cond={TEXT: r.cond[TEXT][None]},
                                 uncond={TEXT: r.uncond[TEXT].reshape(1, 5, 12)},
                                 guidance_scale=r.guidance_scale)[0]
            assert float((o - alone).abs().max() / alone.abs().max()) <= 1e-5
    assert float((out[0] - out[3]).abs().max()) > 1e-3  # conditions and scales act
    bad = [Request(seed=1, nfe=3, schedule=grids[3], cond={TEXT: torch.zeros(5, 12)}),   # no uncond
           Request(seed=1, nfe=3, schedule=grids[3], cond={TEXT: torch.zeros(4, 12)},
                   uncond={TEXT: torch.zeros(5, 12)}, guidance_scale=2.0),                 # wrong shape
           Request(seed=1, nfe=3, schedule=grids[3], cond={TEXT: torch.full((5, 12), float("nan"))},
                   uncond={TEXT: torch.zeros(5, 12)}, guidance_scale=2.0),                 # NaN
           Request(seed=1, nfe=3, schedule=grids[3], cond={}, uncond={TEXT: torch.zeros(5, 12)},
                   guidance_scale=2.0),                                                    # no text
           Request(seed=1, nfe=3, schedule=grids[3], cond={TEXT: torch.zeros(5, 12)},
                   uncond={TEXT: torch.zeros(5, 12)}, guidance_scale=float("inf"))]
    for r, match in zip(bad, ["give uncond", r"shape \(5, 12\)", "NaN", "required", "finite"], strict=True):
        with pytest.raises(ValueError, match=match):
            b.run_all([r])[0]
    plain = ContinuousBatcher(den, (4, 8, 8), capacity=2, sigma_max=sigma_max,
                              conditions={TEXT: indis.TensorCondition((5, 12))})
    with pytest.raises(ValueError, match="without guidance"):
        plain.run_all([reqs[0]])[0]
    with pytest.raises(ValueError, match="TensorCondition"):
        ContinuousBatcher(den, (4, 8, 8), conditions={TEXT: (5, 12, 3)})


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_the_model_gets_its_own_inputs_every_call(backend: str) -> None:
    """Each denoiser call gets a new sigma tensor and a new condition tree, so a model that keeps its inputs
    (a cache keyed on the last timestep) or edits the tree sees no later call's values; a bfloat16 tensor
    condition is served as well (the pool resets its freed slots byte by byte)."""
    from indis.kernels import native

    if backend == "native" and not native.available():
        pytest.skip(native.REASON)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keeper(x: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        seen.append((sigma, sigma.clone()))
        return MODEL(x, sigma) + emb.float().mean(1, keepdim=True)

    def editor(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return keeper(x, sigma, cond.pop("emb"))

    cond = {"emb": indis.TensorCondition((3,), torch.bfloat16)}
    reqs = [Request(seed=i, nfe=3 + i % 3, cond={"emb": torch.full((3,), 0.01 * i)}) for i in range(7)]
    out = ContinuousBatcher(editor, (6,), capacity=3, conditions=cond, backend=backend).run_all(reqs)
    assert len(seen) > 3 and all(torch.equal(kept, copy) for kept, copy in seen)
    assert len({t.data_ptr() for t, _ in seen}) == len(seen)  # all alive, none shared
    alone = [ContinuousBatcher(keeper, (6,), capacity=1, conditions=cond, backend=backend).run_all([r])[0]
             for r in reqs[:3]]
    for a, b in zip(out, alone, strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
