"""The flow sampler: determinism, CFG (scale 1 is exactly no CFG, one batched call), temperature, steps."""

from __future__ import annotations

import pytest
import torch

from ar_model.diffusion_head import DiffusionHead
from ar_model.flow_sampler import check_guidance_interval, guidance_at, sample_flow, shortcut_step_size


class CountingHead(DiffusionHead):
    """A head that records the batch size of each call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []

    def forward(self, x, t, d, cond):  # noqa: D102
        self.calls.append(x.shape[0])
        return super().forward(x, t, d, cond)


def random_head(seed: int = 0, **config) -> CountingHead:
    """A head with every parameter random (a fresh head predicts v = 0, which hides sampler bugs)."""
    torch.manual_seed(seed)
    head = CountingHead(3, 6, {"width": 16, "depth": 2, "frequency_dim": 8, **config})
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return head.eval()


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sampler_is_deterministic_with_a_generator(method: str) -> None:
    head, cond = random_head(), torch.randn(5, 6)
    a = sample_flow(head, cond, 4, method=method, generator=torch.Generator().manual_seed(7))
    b = sample_flow(head, cond, 4, method=method, generator=torch.Generator().manual_seed(7))
    c = sample_flow(head, cond, 4, method=method, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (5, 3) and a.dtype == torch.float32


def test_cfg_scale_one_equals_no_cfg_exactly() -> None:
    head, cond, uncond = random_head(), torch.randn(5, 6), torch.randn(1, 6)
    plain = sample_flow(head, cond, 4, generator=torch.Generator().manual_seed(0))
    for schedule in ("constant", "linear"):
        same = sample_flow(
            head, cond, 4, guidance_scale=1.0, uncond=uncond, cfg_schedule=schedule,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        assert torch.equal(plain, same)
    guided = sample_flow(
        head, cond, 4, guidance_scale=2.0, uncond=uncond, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.equal(plain, guided)


def test_cfg_is_one_batched_call_with_the_guidance_formula() -> None:
    head, cond, uncond = random_head(), torch.randn(5, 6), torch.randn(5, 6)
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    head.calls.clear()
    out = sample_flow(head, cond, 1, guidance_scale=3.0, uncond=uncond, noise=noise)
    assert head.calls == [10]  # cond and uncond rows in one call
    d = shortcut_step_size(head, 1)
    v_c, v_u = head(noise, 0.0, d, cond), head(noise, 0.0, d, uncond)
    torch.testing.assert_close(out, noise + v_u + 3.0 * (v_c - v_u))
    per_row = sample_flow(head, cond, 1, guidance_scale=torch.full((5,), 3.0), uncond=uncond, noise=noise)
    torch.testing.assert_close(per_row, out)


def test_linear_cfg_schedule() -> None:
    assert guidance_at(3.0, 0.25, "constant") == 3.0
    assert guidance_at(3.0, 0.25, "linear") == 1.5
    with pytest.raises(ValueError):
        guidance_at(3.0, 0.5, "cosine")
    head, cond, uncond = random_head(), torch.randn(4, 6), torch.randn(1, 6)
    noise = torch.randn(4, 3)
    linear = sample_flow(head, cond, 1, guidance_scale=3.0, uncond=uncond, cfg_schedule="linear", noise=noise)
    at_mid = sample_flow(head, cond, 1, guidance_scale=2.0, uncond=uncond, noise=noise)  # 1 + 2·0.5
    torch.testing.assert_close(linear, at_mid)


def test_guidance_interval_guides_only_the_steps_that_start_inside_it() -> None:
    head, cond, uncond = random_head(), torch.randn(4, 6), torch.randn(1, 6)
    noise = torch.randn(4, 3)
    kw = dict(guidance_scale=3.0, uncond=uncond, noise=noise)
    everywhere = sample_flow(head, cond, 2, **kw)
    for full in (None, (0.0, 1.0)):
        assert torch.equal(sample_flow(head, cond, 2, guidance_interval=full, **kw), everywhere)
    # 2 steps start at t = 0 and 0.5: (0.5, 1) guides the second only, with cond rows alone in the first
    head.calls.clear()
    late = sample_flow(head, cond, 2, guidance_interval=(0.5, 1.0), **kw)
    assert head.calls == [4, 8]
    x = noise + 0.5 * head(noise, 0.0, 0.5, cond)
    v_c, v_u = head(x, 0.5, 0.5, cond), head(x, 0.5, 0.5, uncond.expand(4, 6))
    torch.testing.assert_close(late, x + 0.5 * (v_u + 3.0 * (v_c - v_u)))
    # an interval no step starts in is exactly the unguided sampler; one with every start is full guidance
    unguided = sample_flow(head, cond, 2, noise=noise)
    assert torch.equal(sample_flow(head, cond, 2, guidance_interval=(0.1, 0.4), **kw), unguided)
    assert torch.equal(sample_flow(head, cond, 2, guidance_interval=(0.0, 0.6), **kw), everywhere)
    heun = sample_flow(head, cond, 2, method="heun", guidance_interval=(0.5, 1.0), **kw)
    assert not torch.equal(heun, sample_flow(head, cond, 2, method="heun", **kw))
    assert check_guidance_interval(None) == (0.0, 1.0) and check_guidance_interval([0.25, 1]) == (0.25, 1.0)
    for bad in ((0.5, 0.5), (0.6, 0.4), (-0.1, 1.0), (0.0, 1.5), (0.5,), "0.5", (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="guidance_interval"):
            sample_flow(head, cond, 2, guidance_interval=bad, **kw)


def test_temperature_scales_the_initial_noise_and_steps_set_d() -> None:
    head = random_head()
    noise = torch.randn(4, 3)
    cond = torch.randn(4, 6)
    torch.testing.assert_close(
        sample_flow(head, cond, 2, temperature=0.5, noise=noise),
        sample_flow(head, cond, 2, noise=0.5 * noise),
    )
    # d = 1/steps for shortcut-trained step sizes (levels=7: down to 1/64), plain flow (d = 0) beyond
    assert [shortcut_step_size(head, s) for s in (1, 2, 4, 64, 128)] == [1.0, 0.5, 0.25, 1 / 64, 0.0]
    assert shortcut_step_size(random_head(shortcut_levels=0), 1) == 0.0
    one = sample_flow(head, cond, 1, noise=noise)
    torch.testing.assert_close(one, noise + head(noise, 0.0, 1.0, cond))  # x1 = x0 + v(x0, 0, d=1)


def test_sampler_checks_arguments() -> None:
    head, cond = random_head(), torch.randn(2, 6)
    with pytest.raises(ValueError, match="uncond"):
        sample_flow(head, cond, 2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="method"):
        sample_flow(head, cond, 2, method="rk4")
    with pytest.raises(ValueError, match="steps"):
        sample_flow(head, cond, 0)
    with pytest.raises(ValueError, match="noise"):
        sample_flow(head, cond, 2, noise=torch.randn(3, 3))
