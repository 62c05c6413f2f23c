"""Condition trees (``engine/core/conditions.py``) and classifier-free guidance over them
(``engine/core/guidance.py``)."""

from __future__ import annotations

import pytest
import torch

import indis
from indis.engine.core.conditions import check_batch, concat, expand, flatten, lookup, select, unflatten
from indis.engine.core.guidance import guidance_key, guided_raw


def _tree(b: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"encoder_hidden_states": torch.randn(b, 5, 4, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(b, 6, generator=g),
                                  "time_ids": torch.randn(b, 2, generator=g)}}


def test_trees_flatten_by_dotted_path_and_back() -> None:
    tree = _tree()
    flat = flatten(tree)
    assert list(flat) == ["encoder_hidden_states", "added_cond_kwargs.text_embeds",
                          "added_cond_kwargs.time_ids"]
    back = unflatten(flat)
    assert back.keys() == tree.keys()
    assert back["added_cond_kwargs"]["time_ids"] is tree["added_cond_kwargs"]["time_ids"]
    assert lookup(tree, "added_cond_kwargs.text_embeds") is tree["added_cond_kwargs"]["text_embeds"]
    with pytest.raises(KeyError, match="have"):
        lookup(tree, "pooled")
    two = concat([tree, select(tree, slice(0, 1))])
    assert two["added_cond_kwargs"]["text_embeds"].shape == (4, 6)
    assert expand(select(tree, slice(0, 1)), 3)["encoder_hidden_states"].shape == (3, 5, 4)


@pytest.mark.parametrize(("cond", "match"), [
    ({"a.b": torch.zeros(3)}, "without dots"),
    ({"a": 3}, "must be a Tensor or a dict"),
    ({"a": {1: torch.zeros(3)}}, "non-empty string"),
    ([torch.zeros(3)], "dict of tensors"),
])
def test_bad_trees_are_refused(cond, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        flatten(cond)


def test_batch_sizes_are_checked_and_one_row_may_be_shared() -> None:
    tree = _tree(3)
    check_batch(tree, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"added_cond_kwargs.text_embeds.*batch size 3"):
        check_batch({**tree, "added_cond_kwargs": select(tree["added_cond_kwargs"], slice(0, 2))}, 3,
                    torch.device("cpu"))
    one = select(tree, slice(0, 1))
    with pytest.raises(ValueError, match="batch size 3"):
        check_batch(one, 3, torch.device("cpu"))
    check_batch(one, 3, torch.device("cpu"), broadcast=True)
    with pytest.raises(ValueError, match="different inputs"):
        concat([tree, {"encoder_hidden_states": tree["encoder_hidden_states"]}])
    with pytest.raises(ValueError, match="after the batch axis"):
        concat([tree, {**tree, "encoder_hidden_states": torch.zeros(3, 5, 2)}])


def _net(x: torch.Tensor, t: torch.Tensor, encoder_hidden_states, added_cond_kwargs) -> torch.Tensor:
    """Per-sample and nonlinear in the condition: a guidance bug shows."""
    c = encoder_hidden_states.mean((1, 2)) + added_cond_kwargs["text_embeds"].square().mean(1)
    return torch.tanh(x) * (1 + c.view(-1, 1)) + 0.01 * t.view(-1, 1)


def test_a_shared_negative_prompt_equals_it_repeated_and_the_key_tells_guidance_apart() -> None:
    den = indis.Denoiser(_net, "vp_linear", "eps", "t", 1000.0)
    x, t = torch.randn(3, 4), torch.full((3,), 500.0)
    cond = _tree(3)
    neg = {"encoder_hidden_states": torch.zeros(1, 5, 4),
           "added_cond_kwargs": {"text_embeds": torch.ones(1, 6), "time_ids": torch.zeros(1, 2)}}
    shared = guided_raw(den, x, t, cond, neg, 4.0)
    repeated = guided_raw(den, x, t, cond, expand(neg, 3), 4.0, batched=False)
    torch.testing.assert_close(shared, repeated)
    u, c = den.raw(x, t, **expand(neg, 3)), den.raw(x, t, **cond)
    torch.testing.assert_close(shared, u + 4.0 * (c - u))
    keys = [guidance_key(indis.guided(den, neg, s)) for s in (4.0, 5.0)]
    other = guidance_key(indis.guided(den, {**neg, "encoder_hidden_states": torch.ones(1, 5, 4)}, 4.0))
    assert guidance_key(den) is None and len({str(k) for k in (*keys, other)}) == 3
    assert keys[0] == guidance_key(indis.guided(den, neg, 4.0))


def test_a_badly_shaped_uncond_is_named_and_a_0_dim_scale_is_a_float() -> None:
    den = indis.Denoiser(_net, "vp_linear", "eps", "t", 1000.0)
    x, cond = torch.randn(4, 4), _tree(4)
    neg = {"encoder_hidden_states": torch.zeros(1, 5, 4),
           "added_cond_kwargs": {"text_embeds": torch.ones(1, 6), "time_ids": torch.zeros(1, 2)}}
    grid = indis.get_sigmas("edm", 3, 0.01, 50.0)
    for bad in ({**neg, "encoder_hidden_states": torch.zeros(2, 5, 4)},
                {**neg, "encoder_hidden_states": torch.tensor(0.0)}):
        with pytest.raises(ValueError, match=r"uncond\['encoder_hidden_states'\].*batch size 4 \(or 1\)"):
            indis.sample(den, x, grid, "euler", cond=cond, uncond=bad, guidance_scale=3.0)
    torch.testing.assert_close(
        indis.sample(den, x, grid, "euler", cond=cond, uncond=neg, guidance_scale=torch.tensor(3.0)),
        indis.sample(den, x, grid, "euler", cond=cond, uncond=neg, guidance_scale=3.0))
