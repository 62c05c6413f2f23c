"""Admission on its own: requests in, validated plain data and groups with their pool rows out."""

from __future__ import annotations

import pytest
import torch

import indis
from indis.engine.core.families import Denoiser, VPLinear, as_denoiser
from indis.engine.serving.admission import Admission, Admitted, Request, opts_key
from indis.engine.studies.convergence import small_mixture
from indis.engine.tuning.teacher import initial_state, noise_from_seeds

MIXTURE = small_mixture()


def _admission(model=MIXTURE, dtype: torch.dtype = torch.float64, **kw) -> Admission:
    args = dict(sigma_min=0.002, sigma_max=80.0, predictors={}, predictor_cond=None, chooser=None,
                conditions={}, max_stages=8, device=torch.device("cpu"), dtype=dtype,
                coef_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return Admission(as_denoiser(model), (6,), **(args | kw))


def test_a_request_becomes_plain_data() -> None:
    grid = indis.get_sigmas("logsnr", 4, 0.002, 80.0)
    item = _admission().prepare(Request(seed=3, nfe=4, schedule=grid, solver="dpmpp_2m"))
    assert isinstance(item, Admitted) and item.nfe == 4 and item.cached is None
    torch.testing.assert_close(item.grid, grid.double(), rtol=0, atol=0)
    torch.testing.assert_close(item.x_T, noise_from_seeds([3], (6,), dtype=torch.float64)[0] * 80.0)
    assert item.group == ("dpmpp_2m", 4, (), False, False, None)


def test_a_vp_request_by_seed_starts_as_the_teacher() -> None:
    vp = Denoiser(lambda x, t: torch.zeros_like(x), VPLinear(), prediction="eps")
    adm = _admission(vp, sigma_max=40.0)
    item = adm.prepare(Request(seed=5, nfe=3, schedule="edm"))
    want = initial_state(noise_from_seeds([5], (6,), dtype=torch.float64)[0], 40.0, vp.family)
    torch.testing.assert_close(item.x_T, want, rtol=0, atol=0)
    assert not torch.allclose(item.x_T, noise_from_seeds([5], (6,), dtype=torch.float64)[0] * 40.0)


@pytest.mark.parametrize("shape", [(6,), (2, 16)])  # torch's scalar and vectorised normal draws
def test_states_drawn_together_start_as_the_teacher_bit_for_bit(shape: tuple) -> None:
    """Admission draws a batch's seeds into one reused buffer and scales them together; each state is
    ``teacher.initial_state`` of its seed's noise exactly, batch after batch."""
    vp = Denoiser(lambda x, t: torch.zeros_like(x), VPLinear(), prediction="eps")
    args = dict(sigma_min=0.002, sigma_max=40.0, predictors={}, predictor_cond=None, chooser=None,
                conditions={}, max_stages=8, device=torch.device("cpu"), dtype=torch.float32,
                coef_dtype=torch.float32)
    adm = Admission(vp, shape, **args)
    for seeds in ([4, 2**63 + 5, 0], [9], [11, 12, 13, 14, 15]):  # a larger batch grows the buffer
        drawn = adm.seed_states([Request(seed=s, nfe=3) for s in seeds] + [Request(x_T=torch.zeros(shape))])
        assert drawn[-1] is None  # a given x_T is not drawn
        for s, x in zip(seeds, drawn, strict=False):
            want = initial_state(noise_from_seeds([s], shape, dtype=torch.float64)[0], 40.0, vp.family)
            assert x.dtype == torch.float64 and torch.equal(x, want)


def test_admit_fails_bad_requests_alone_and_groups_the_rest() -> None:
    grid = indis.get_sigmas("edm", 5, 0.002, 80.0)
    batch = [(Request(seed=0, nfe=5), "a"), (Request(seed=1, nfe=5), "b"),
             (Request(seed=2, nfe=5, schedule=grid), "c"),
             (Request(seed=3, nfe=5, schedule=indis.Schedule(grid, torch.zeros(5), None)), "d"),
             (Request(seed=4, nfe=99), "bad nfe"), (Request(seed=-1), "bad seed"),
             (Request(seed=5, solver="nope"), "bad solver")]
    ready, failed = _admission().admit(batch)
    assert sorted(o for o, _ in failed) == ["bad nfe", "bad seed", "bad solver"]
    assert all(isinstance(e, ValueError) for _, e in failed)
    assert sorted(g.owners for g in ready) == [["a", "b"], ["c"], ["d"]]  # heuristic / grid / with shift
    for g in ready:  # the heuristic group shares one cached row; the others have one row per sample
        rows = 1 if g.owners == ["a", "b"] else len(g.owners)
        assert g.rows.shape == (rows, 8, 2 + 2 * 6) and g.time.shape == (rows, 8)
        assert g.stages == 5 and not g.rows[:, 5:].any()


def test_heuristic_schedules_share_one_cached_table() -> None:
    adm = _admission()
    ready, _ = adm.admit([(Request(seed=i, nfe=3, schedule="edm"), i) for i in range(3)])
    (group,) = ready
    assert len(adm.tables) == 1 and group.rows.data_ptr() == next(iter(adm.tables.values()))[0].data_ptr()
    ready, _ = adm.admit([(Request(seed=9, nfe=3, schedule="edm"), 9)])
    assert len(adm.tables) == 1


def test_coefficients_are_checked_in_the_dtype_the_pool_keeps_them() -> None:
    """The batcher's tables pass the same coefficient check as ``indis.sample``, in the dtype that holds
    them: a float16 pool keeps float32 rows, so Heun's 1 / sigma_min = 1e5 is served, while the reference
    loop of a float16 ``indis.sample`` (which casts its coefficients to float16) refuses it."""
    grid = torch.tensor([80.0, 1.0, 1e-5, 0.0])
    with pytest.raises(ValueError, match="a coefficient of this grid"):
        indis.sample(MIXTURE, torch.zeros(1, 6, dtype=torch.float16), grid, "heun", backend="torch")
    ready, failed = _admission(dtype=torch.float16).admit([(Request(seed=0, nfe=3, schedule=grid,
                                                                    solver="heun"), "x")])
    assert not failed and ready[0].rows.dtype == torch.float32 and ready[0].rows.abs().max() >= 1e5


def test_an_auto_nfe_is_reported_before_the_rest_is_validated() -> None:
    told = []
    adm = _admission(chooser=lambda x, c: [5])
    ready, failed = adm.admit([(Request(seed=0, nfe="auto", solver="nope"), "x")],
                              on_nfe=lambda owner, nfe: told.append((owner, nfe)))
    assert told == [("x", 5)] and not ready and "nope" in str(failed[0][1])


def test_solver_options_are_keyed_by_type_and_checked() -> None:
    assert opts_key({"order": 2}) != opts_key({"order": 2.0})
    assert opts_key({"disable_corrector": [1]}) == (("disable_corrector", ("int",), (1,)),)
    with pytest.raises(ValueError, match="must be a number"):
        opts_key({"disable_corrector": {1: 2}})
