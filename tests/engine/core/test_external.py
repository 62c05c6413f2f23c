"""diffusers models and schedulers through ``indis.from_diffusers`` / ``indis.grid_from_scheduler``: tiny
random models built from configs, against diffusers' own loops."""

from __future__ import annotations

import math

import pytest
import torch

import indis
from indis.engine.core.external import family_from_config
from indis.engine.testbeds.tiny_diffusers import TEXT, text_unet

diffusers = pytest.importorskip("diffusers")
TOL = 1e-5


def _unet(out_channels: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=out_channels, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def _noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(seed))


def _diffusers_loop(sched, call, x: torch.Tensor) -> torch.Tensor:
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        x = sched.step(call(x_in, t), t, x).prev_sample
    return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize(("solver", "cls", "kw"), [
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"prediction_type": "v_prediction"}),
    ("unipc", "UniPCMultistepScheduler", {}),
    ("euler", "DDIMScheduler", {"set_alpha_to_one": True, "clip_sample": False}),
    ("euler", "DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}),
])
def test_a_diffusers_unet_samples_like_the_diffusers_loop(solver: str, cls: str, kw: dict) -> None:
    unet = _unet()
    sched = getattr(diffusers, cls)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **kw)
    den = indis.from_diffusers(unet, sched)
    grid = indis.grid_from_scheduler(sched, 8)
    sched.set_timesteps(8)
    with torch.no_grad():
        ref = _diffusers_loop(sched, lambda x, t: unet(x, t).sample, _noise() * sched.init_noise_sigma)
        ours = indis.sample(den, _noise(), grid, solver)
    assert _rel(ours, ref) <= TOL, _rel(ours, ref)
    moves = kw.get("set_alpha_to_one", True) or cls != "DDIMScheduler"  # else DDIM's last step stays at t=0
    assert grid.numel() == (9 if moves else 8) and (grid[-1] == 0) == moves


def test_karras_sigmas_need_the_pipelines_rounding_for_parity() -> None:
    unet = _unet()
    sched = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True)
    grid = indis.grid_from_scheduler(sched, 6)
    sched.set_timesteps(6)
    with torch.no_grad():
        ref = _diffusers_loop(sched, lambda x, t: unet(x, t).sample, _noise())
        exact = indis.sample(indis.from_diffusers(unet, sched), _noise(), grid, "dpmpp_2m")
        rounded = indis.sample(indis.from_diffusers(unet, sched, timestep_rounding="round"), _noise(), grid,
                               "dpmpp_2m")
    assert _rel(rounded, ref) <= TOL < _rel(exact, ref)


class _Transformer(torch.nn.Module):
    """SD3 / FLUX-shaped: ``(hidden_states, encoder_hidden_states, ..., timestep)``, returns a tuple."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.proj = torch.nn.Linear(4, 2)

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                return_dict=True):
        text = self.proj(encoder_hidden_states.mean(1))[:, :, None, None]
        out = torch.tanh(self.conv(hidden_states)) * (1 + timestep.view(-1, 1, 1, 1) / 1000) + text
        return (out,)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_a_flow_transformer_with_text_samples_like_flow_match_euler(shift: float) -> None:
    model = _Transformer()
    text = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2))
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    grid = indis.grid_from_scheduler(sched, 6)
    assert math.isinf(grid[0]) and grid[-1] == 0 and grid.numel() == 7
    sched.set_timesteps(6)
    with torch.no_grad():
        ref = _diffusers_loop(sched, lambda x, t: model(x, encoder_hidden_states=text,
                                                        timestep=t.expand(2))[0], _noise())
        ours = indis.sample(indis.from_diffusers(model, sched), _noise(), grid, "euler",
                            cond={"encoder_hidden_states": text})
    assert _rel(ours, ref) <= TOL, _rel(ours, ref)


def test_learned_variance_channels_are_split_off() -> None:
    unet = _unet(out_channels=4)
    sched = diffusers.DDPMScheduler(variance_type="learned_range")
    den = indis.from_diffusers(unet, sched)
    x, t = _noise(), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(den.raw(x, t), unet(x, t).sample[:, :2], rtol=0, atol=0)


def test_the_family_comes_from_the_config_frozen_dict_and_trained_betas_included() -> None:
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                             beta_end=0.012)
    fam = family_from_config(sched.config)  # a FrozenDict
    torch.testing.assert_close(fam.alphas_cumprod, sched.alphas_cumprod.double(), rtol=0, atol=0)
    betas = torch.linspace(1e-4, 0.03, 50).tolist()
    trained = diffusers.DDIMScheduler(num_train_timesteps=50, trained_betas=betas)
    torch.testing.assert_close(family_from_config(trained).alphas_cumprod, trained.alphas_cumprod.double(),
                               rtol=0, atol=0)
    for kind, ours in (("v_prediction", "v"), ("sample", "x0"), ("epsilon", "eps")):
        config = {"prediction_type": kind, "clip_sample": False}
        assert indis.from_diffusers(_unet(), diffusers.DDPMScheduler(**config)).prediction == ours
    with pytest.warns(UserWarning, match="clip_sample"):
        indis.from_diffusers(_unet(), diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match="prediction_type"):
        indis.from_diffusers(_unet(), {"prediction_type": "nonsense", "beta_schedule": "linear"})
    with pytest.raises(ValueError, match="timestep_rounding"):
        indis.from_diffusers(_unet(), sched, timestep_rounding="ceil")
    with pytest.raises(ValueError, match="scheduler or its config"):
        indis.from_diffusers(_unet(), 3)


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DDPMScheduler", "HeunDiscreteScheduler",
                                 "EulerDiscreteScheduler", "UniPCMultistepScheduler"])
def test_grid_from_scheduler_is_its_own_grid_with_a_final_zero(cls: str) -> None:
    sched = getattr(diffusers, cls)()
    before = sched.num_inference_steps
    grid = indis.grid_from_scheduler(sched, 5)
    assert grid.dtype == torch.float64 and grid.numel() == 6 and grid[-1] == 0
    assert bool((grid[1:] < grid[:-1]).all())
    assert sched.num_inference_steps == before  # the caller's scheduler is left as it was
    ref = getattr(diffusers, cls)()
    ref.set_timesteps(5)
    fam = family_from_config(ref)
    first_t = fam.t(grid[:1])
    torch.testing.assert_close(first_t, ref.timesteps[:1].double(), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="positive int"):
        indis.grid_from_scheduler(sched, 0)


def test_an_sdxl_style_unet_with_added_cond_kwargs_samples_like_euler_discrete() -> None:
    """A ``UNet2DConditionModel`` with text embeddings and SDXL's ``added_cond_kwargs`` (a nested dict), on
    the Euler scheduler's own grid; diffusers' latents are VE (``init_noise_sigma``), indis' state is the VP
    model's own coordinate, so the start is scaled by alpha(sigma_max)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 + 6 * 4).eval()
    g = torch.Generator().manual_seed(3)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    added = {"text_embeds": torch.randn(2, 6, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                             beta_end=0.012)
    den = indis.from_diffusers(unet, sched)
    grid = indis.grid_from_scheduler(sched, 6)
    sched.set_timesteps(6)
    with torch.no_grad():
        def call(z, t):
            return unet(z, t, encoder_hidden_states=emb, added_cond_kwargs=added).sample

        ref = _diffusers_loop(sched, call, x * sched.init_noise_sigma)
        start = x * sched.init_noise_sigma * den.family.alpha(grid[:1]).float()
        ours = indis.sample(den, start, grid, "euler",
                            cond={"encoder_hidden_states": emb, "added_cond_kwargs": added})
    assert _rel(ours, ref) <= TOL, _rel(ours, ref)


@pytest.mark.parametrize(("cls", "solver"), [("DPMSolverMultistepScheduler", "dpmpp_2m"),
                                             ("UniPCMultistepScheduler", "unipc")])
def test_flow_mode_dpm_and_unipc_need_the_truncated_timestep(cls: str, solver: str) -> None:
    """DPM-Solver / UniPC with ``use_flow_sigmas`` hand the model ``int(1000 t)``: with
    ``timestep_rounding="floor"`` indis matches them; with the exact t it does not."""
    model = _Transformer()
    text = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2))
    sched = getattr(diffusers, cls)(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    grid = indis.grid_from_scheduler(sched, 6)
    sched.set_timesteps(6)
    cond = {"encoder_hidden_states": text}
    with torch.no_grad():
        ref = _diffusers_loop(sched, lambda x, t: model(x, timestep=t.expand(2), **cond)[0], _noise())
        floor = indis.sample(indis.from_diffusers(model, sched, timestep_rounding="floor"), _noise(), grid,
                             solver, cond=cond)
        exact = indis.sample(indis.from_diffusers(model, sched), _noise(), grid, solver, cond=cond)
    assert _rel(floor, ref) <= TOL < _rel(exact, ref)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: diffusers.EDMEulerScheduler(), "EDM"),
    (lambda: diffusers.EulerDiscreteScheduler(timestep_type="continuous"), "timestep_type"),
    (lambda: diffusers.DDIMScheduler(rescale_betas_zero_snr=True), "zero-terminal-SNR"),
    (lambda: diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction"), "use_flow_sigmas"),
])
def test_configs_indis_does_not_reproduce_are_refused(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        indis.from_diffusers(_unet(), make())
    with pytest.raises(ValueError, match=match):
        indis.from_diffusers(_unet(), make().config)  # the config alone too
    with pytest.raises(ValueError, match=match):
        indis.grid_from_scheduler(make(), 5)


def test_grids_follow_the_schedulers_own_steps() -> None:
    """A last sigma above 0 is kept (no step the scheduler never runs), Heun-style repeats collapse, a DDIM
    spacing whose steps skip its timesteps is refused, set_timesteps arguments and a set shift are used."""
    sched = diffusers.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    grid = indis.grid_from_scheduler(sched, 8)
    sched.set_timesteps(8)
    assert grid.numel() == 9 and grid[-1] == sched.sigmas[-1].double() > 0
    unet = _unet()
    with torch.no_grad():
        ref = _diffusers_loop(sched, lambda x, t: unet(x, t).sample, _noise())
        ours = indis.sample(indis.from_diffusers(unet, sched), _noise(), grid, "dpmpp_2m")
    assert _rel(ours, ref) <= TOL, _rel(ours, ref)
    heun = indis.grid_from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(), 5)
    assert indis.grid_from_scheduler(diffusers.FlowMatchHeunDiscreteScheduler(), 5).equal(heun)
    with pytest.raises(ValueError, match="not one grid"):
        indis.grid_from_scheduler(diffusers.DDIMScheduler(timestep_spacing="linspace"), 8)
    def flow_grid(sched, **kw) -> torch.Tensor:  # the scheduler's own t, as sigma
        sched.set_timesteps(5, **kw)
        return indis.as_grid(timesteps=sched.sigmas.double(), family="flow")[0]

    dynamic = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    shifted = indis.grid_from_scheduler(dynamic, 5, mu=math.log(3.0))
    assert torch.equal(shifted, flow_grid(dynamic, mu=math.log(3.0)))
    plain = diffusers.FlowMatchEulerDiscreteScheduler()
    plain.set_shift(3.0)
    moved = indis.grid_from_scheduler(plain, 5)
    assert torch.equal(moved, flow_grid(plain)) and not torch.equal(moved, heun)


class _DictModel(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x, timestep=None):
        return {"out": x.repeat(1, self.channels // x.shape[1], 1, 1) * 0.5}


def test_outputs_are_unwrapped_and_only_a_learned_variance_is_split() -> None:
    x, t = _noise(), torch.tensor([10.0, 700.0])
    plain = diffusers.DDPMScheduler(clip_sample=False)
    torch.testing.assert_close(indis.from_diffusers(_DictModel(2), plain).raw(x, t), x * 0.5)
    with pytest.raises(ValueError, match="of the input's shape"):  # 2C channels without a learned variance
        indis.from_diffusers(_DictModel(4), plain).raw(x, t)
    learned = diffusers.DDPMScheduler(clip_sample=False, variance_type="learned")
    torch.testing.assert_close(indis.from_diffusers(_DictModel(4), learned).raw(x, t), x * 0.5)


def test_a_flux_style_transformer_takes_t_not_1000_t() -> None:
    class FluxTransformer2DModel(torch.nn.Module):
        def forward(self, x, timestep=None):
            return x * 0 + timestep.view(-1, 1, 1, 1)

    sched = diffusers.FlowMatchEulerDiscreteScheduler()
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)
    flux = indis.from_diffusers(FluxTransformer2DModel(), sched)
    sd3 = indis.from_diffusers(_DictModel(2), sched)
    assert flux.time_scale == 1.0 and sd3.time_scale == 1000.0
    assert torch.equal(flux.time(flux.family.sigma(t)), t)


def _rescale_noise_cfg(cfg: torch.Tensor, text: torch.Tensor, rescale: float) -> torch.Tensor:
    """Lin et al. 2024, eq. 16, as diffusers' pipelines apply it (std over all but the batch axis)."""
    dims = list(range(1, text.ndim))
    rescaled = cfg * (text.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * cfg


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_classifier_free_guidance_matches_a_diffusers_pipeline_loop(rescale: float) -> None:
    """CFG 7.5 on a tiny UNet2DConditionModel with DPM-Solver++ 2M: diffusers' batched [uncond; cond] loop
    against ``indis.sample(..., cond=, uncond=, guidance_scale=)`` on the scheduler's grid."""
    unet = text_unet()
    g = torch.Generator().manual_seed(4)
    x, pos = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    neg = torch.zeros(2, 5, 12)
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                  beta_end=0.012)
    den, grid = indis.from_diffusers(unet, sched), indis.grid_from_scheduler(sched, 6)
    sched.set_timesteps(6)

    def cfg(z, t):
        u, c = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([neg, pos])).sample.chunk(2)
        out = u + 7.5 * (c - u)
        return _rescale_noise_cfg(out, c, rescale) if rescale else out

    with torch.no_grad():
        ref = _diffusers_loop(sched, cfg, x)
        ours = indis.sample(den, x, grid, "dpmpp_2m", cond={TEXT: pos},
                            uncond={TEXT: neg}, guidance_scale=7.5, guidance_rescale=rescale)
        two = indis.sample(den, x, grid, "dpmpp_2m", cond={TEXT: pos},
                           uncond={TEXT: neg}, guidance_scale=7.5, guidance_rescale=rescale,
                           guidance_batched=False)
    assert _rel(ours, ref) <= TOL, _rel(ours, ref)
    assert _rel(two, ours) <= TOL


def test_per_sample_guidance_equals_each_sample_alone_and_bad_use_is_refused() -> None:
    unet = text_unet()
    g = torch.Generator().manual_seed(5)
    x, pos = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 12, generator=g)
    neg = torch.zeros(3, 5, 12)
    sched = diffusers.DPMSolverMultistepScheduler()
    den, grid = indis.from_diffusers(unet, sched), indis.grid_from_scheduler(sched, 4)
    scales = torch.tensor([1.0, 4.0, 9.0])
    with torch.no_grad():
        batch = indis.sample(den, x, grid, "dpmpp_2m", cond={TEXT: pos},
                             uncond={TEXT: neg}, guidance_scale=scales)
        for i in range(3):
            alone = indis.sample(den, x[i:i + 1], grid, "dpmpp_2m", cond={TEXT: pos[i:i + 1]},
                                 uncond={TEXT: neg[i:i + 1]}, guidance_scale=float(scales[i]))
            assert _rel(batch[i:i + 1], alone) <= TOL
        assert _rel(batch[:1], batch[2:]) > 1e-3  # the scales do act
    cond = {TEXT: pos}
    for kw, match in [({"guidance_scale": 2.0}, "together"), ({"uncond": {TEXT: neg}}, "together"),
                      ({"uncond": {"other": neg}, "guidance_scale": 2.0}, "same inputs"),
                      ({"uncond": {TEXT: neg}, "guidance_scale": float("nan")}, "finite"),
                      ({"uncond": {TEXT: neg}, "guidance_scale": torch.ones(2)}, "2 values for a batch of 3"),
                      ({"uncond": {TEXT: neg}, "guidance_scale": 2.0,
                        "guidance_rescale": 2.0}, r"\[0, 1\]")]:
        with pytest.raises(ValueError, match=match):
            indis.sample(den, x, grid, "dpmpp_2m", cond=cond, **kw)
