"""Teacher end points: the sharded, resumable cache and the seed-regenerated noise and labels."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import indis
from indis.engine.tuning.teacher import (
    TeacherCache,
    TeacherSpec,
    draw_noise,
    labels_from_seeds,
    noise_from_seeds,
)
from tests.helpers import gaussian_denoiser
from tests.helpers import subprocess_env as _env

SEEDS = [0, 5, 123456]
TIMEOUT = 180


def test_teacher_cache_is_sharded_resumable_and_exact(tmp_path) -> None:
    kw = dict(backbone="gauss", shape=(4,), sigma_min=0.002, sigma_max=80.0,
              teacher=TeacherSpec("ipndm", 10), shard_size=8, dtype=torch.float64)
    cache = TeacherCache(tmp_path, **kw)
    cache.build(gaussian_denoiser, range(0, 20), progress=False)
    files = sorted(cache.dir.glob("seeds_*.safetensors"))
    assert [f.name for f in files] == [f"seeds_{a:09d}_{a + 8:09d}.safetensors" for a in (0, 8, 16)]
    stamp = files[0].stat().st_mtime_ns
    cache.build(gaussian_denoiser, range(0, 30), progress=False)  # resumes: old shards untouched
    assert files[0].stat().st_mtime_ns == stamp and len(list(cache.dir.glob("seeds_*"))) == 4
    data = cache.load(range(5, 13))
    x_T = noise_from_seeds(range(5, 13), (4,), dtype=torch.float64) * 80
    assert torch.equal(data.x_T, x_T)
    torch.testing.assert_close(data.x0, indis.sample(gaussian_denoiser, x_T, cache.teacher_grid(), "ipndm"),
                               rtol=0, atol=1e-12)
    other = TeacherCache(tmp_path, **{**kw, "teacher": TeacherSpec("ipndm", 20)})
    assert other.dir != cache.dir
    with pytest.raises(FileNotFoundError, match="build"):
        other.load(range(0, 4))


# ------------------------------------------------------------------------------------- seed regeneration
def test_noise_and_labels_regenerate_bit_exactly_in_another_process(tmp_path: Path) -> None:
    out = tmp_path / "noise.pt"
    code = textwrap.dedent(f"""
        import torch
        from indis.engine.tuning.teacher import labels_from_seeds, noise_from_seeds
        torch.save({{"noise": noise_from_seeds({SEEDS!r}, (1, 8, 8)),
                     "labels": labels_from_seeds({SEEDS!r}, 10)}}, {str(out)!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=TIMEOUT, env=_env())
    other = torch.load(out)
    noise, labels = noise_from_seeds(SEEDS, (1, 8, 8)), labels_from_seeds(SEEDS, 10)
    assert noise.shape == (3, 1, 8, 8) and noise.dtype == torch.float32
    assert labels.shape == (3,) and labels.dtype == torch.long
    assert torch.equal(other["noise"], noise)
    assert torch.equal(other["labels"], labels)
    assert not torch.equal(noise[0], noise[1])  # different seeds, different noise


def test_noise_does_not_depend_on_the_batch() -> None:
    batch = noise_from_seeds([0, 5, 9], (1, 8, 8))
    assert torch.equal(noise_from_seeds([5], (1, 8, 8))[0], batch[1])
    assert torch.equal(noise_from_seeds(torch.tensor([9, 0]), (1, 8, 8)), batch[[2, 0]])
    lab = labels_from_seeds([0, 5, 9], 10)
    assert torch.equal(labels_from_seeds([5], 10), lab[1:2])


@pytest.mark.parametrize("shape", [(1, 8, 8), (3,)])  # the vectorised draw (>= 16 values) and the scalar one
def test_noise_drawn_into_reused_rows_with_a_reused_generator_is_the_same(shape: tuple) -> None:
    """A batcher's admission draws into one buffer with one generator (``draw_noise``): the same rows as
    torch.randn with a freshly seeded generator, whatever was drawn before."""
    rows, gen = torch.empty(4, *shape).unbind(0), torch.Generator()
    seeds = (7, 3, 2**63)
    want = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    draw_noise(rows, [1, 2, 3, 4], gen)
    draw_noise(rows[:3], list(seeds), gen)  # on the last draw's leftovers
    assert torch.equal(torch.stack(rows[:3]), want)
    assert torch.equal(noise_from_seeds(list(seeds), shape, dtype=torch.float64), want.double())


def _text_model(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """A denoiser whose output depends on a text-like condition ``[B, 3]``."""
    return gaussian_denoiser(x, sigma) + 0.1 * text.mean(1, keepdim=True)


def test_conditions_are_stored_with_the_seeds_and_a_changed_source_or_guidance_is_refused(tmp_path) -> None:
    prompts = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))

    def conditions(seeds: torch.Tensor):
        emb = prompts[seeds % 5]
        return {"text": emb}, emb * 2

    kw = dict(backbone="toy", shape=(4,), sigma_min=0.002, sigma_max=80.0, shard_size=4,
              teacher=TeacherSpec("euler", 4), conditions_key="five-prompts")
    cache = TeacherCache(tmp_path, conditions=conditions, **kw)
    cache.build(gaussian_denoiser, range(0, 8), progress=False)  # a model without guidance
    data = cache.load(range(2, 7))
    assert torch.equal(data.cond["text"], prompts[torch.arange(2, 7) % 5])
    assert torch.equal(data.phi_cond, 2 * prompts[torch.arange(2, 7) % 5])
    prompts.add_(1.0)  # another prompt list under the same conditions_key
    with pytest.raises(ValueError, match="conditions changed under conditions_key='five-prompts'"):
        cache.load(range(0, 4))
    guided = indis.guided(indis.Denoiser(_text_model), {"text": torch.zeros(1, 3)}, 5.0)
    with pytest.raises(ValueError, match="guidance"):
        cache.build(guided, range(0, 8), progress=False)
    with pytest.raises(ValueError, match="conditions_key"):
        TeacherCache(tmp_path, conditions=conditions, **{**kw, "conditions_key": ""})
