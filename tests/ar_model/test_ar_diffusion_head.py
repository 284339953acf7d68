"""The diffusion head and its flow loss on toys: init, loss decrease, a 2-D Gaussian mixture, shortcuts.

The toy: four well-separated modes at (±2, ±2) (std 0.1); the condition is a one-hot of the mode, or a
fifth "unconditional" slot (half of the training rows, as the empty-caption rows of CFG). A small head
trained for a few hundred steps must sample each selected mode, cover all four unconditionally, and its
1-step shortcut samples must agree with its 8-step samples from the same noise.
"""

from __future__ import annotations

import pytest
import torch

from ar_model.diffusion_head import DiffusionHead, DiffusionHeadConfig, timestep_embedding
from ar_model.flow_matching import (
    FlowLossConfig,
    flow_matching_loss,
    interpolate,
    sample_shortcut_steps,
    sample_times,
)
from ar_model.flow_sampler import sample_flow

MODES = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -2.0]])  # (4, 2)
UNCOND = 4  # index of the unconditional slot of the one-hot condition
STD = 0.1


def mixture_batch(n: int, g: torch.Generator, p_uncond: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditions ``(n, 5)`` (one-hot mode, or the uncond slot) and samples ``(n, 2)`` of the mixture."""
    k = torch.randint(0, 4, (n,), generator=g)  # (n,)
    x = MODES[k] + STD * torch.randn(n, 2, generator=g)  # (n, 2)
    drop = torch.rand(n, generator=g) < p_uncond  # (n,)
    cond = torch.nn.functional.one_hot(torch.where(drop, UNCOND, k), 5).float()  # (n, 5)
    return cond, x


def one_hot(k: int, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.full((n,), k), 5).float()  # (n, 5)


def train_head(steps: int, seed: int = 0, **head_kw) -> tuple[DiffusionHead, list[float]]:
    torch.manual_seed(seed)
    head = DiffusionHead(
        2, 5, DiffusionHeadConfig(**{"width": 64, "depth": 2, "frequency_dim": 32, **head_kw})
    )
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0)
    cfg = FlowLossConfig(samples_per_position=4, shortcut_fraction=0.25 if head.step_embed else 0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:  # constant, then linear decay over the second half
            group["lr"] = 3e-3 * min(1.0, 2 * (1 - step / steps))
        cond, x = mixture_batch(64, g)
        out = flow_matching_loss(head, cond, x, cfg, g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return head.eval(), losses


@pytest.fixture(scope="module")
def toy_head() -> DiffusionHead:
    head, _ = train_head(300)
    return head


def near_fraction(samples: torch.Tensor, centers: torch.Tensor, radius: float) -> float:
    return (torch.cdist(samples, centers).min(dim=1).values < radius).float().mean().item()


# ----------------------------------------------------------------------------- head and config
def test_head_starts_at_zero_velocity_with_zeroed_modulation() -> None:
    head = DiffusionHead(3, 8, DiffusionHeadConfig(width=16, depth=2, frequency_dim=8))
    for block in head.blocks:
        assert not block.modulation[1].weight.any() and not block.modulation[1].bias.any()
    assert not head.final.out_proj.weight.any() and not head.final.modulation[1].weight.any()
    assert head.input_proj.weight.any()  # the rest is not zero
    v = head(torch.randn(5, 3), torch.rand(5), torch.zeros(5), torch.randn(5, 8))
    assert v.shape == (5, 3) and not v.any()


def test_head_accepts_leading_dims_scalars_and_checks_shapes() -> None:
    head = DiffusionHead(3, 8, DiffusionHeadConfig(width=16, depth=1, frequency_dim=8))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, c = torch.randn(2, 4, 3), torch.randn(2, 4, 8)
    v = head(x, 0.5, 0.25, c)  # (2, 4, 3)
    flat = head(x.reshape(8, 3), torch.full((8,), 0.5), torch.full((8,), 0.25), c.reshape(8, 8))
    torch.testing.assert_close(v.reshape(8, 3), flat)
    assert not torch.equal(head(x, 0.5, 0.0, c), v)  # d is an input
    with pytest.raises(ValueError, match="expected x"):
        head(torch.randn(4, 2), 0.5, 0.0, torch.randn(4, 8))


def test_head_without_shortcut_has_no_step_input() -> None:
    head = DiffusionHead(2, 4, {"width": 16, "depth": 1, "frequency_dim": 8, "shortcut_levels": 0})
    assert head.step_embed is None
    head(torch.randn(3, 2), 0.1, 0.0, torch.randn(3, 4))
    with pytest.raises(ValueError, match="no step-size input"):
        head(torch.randn(3, 2), 0.1, 0.5, torch.randn(3, 4))
    with pytest.raises(ValueError, match="shortcut_fraction"):
        flow_matching_loss(head, torch.randn(3, 4), torch.randn(3, 2), FlowLossConfig(shortcut_fraction=0.5))


@pytest.mark.parametrize(
    "bad",
    [
        {"width": 0},
        {"depth": 1.5},
        {"frequency_dim": 7},
        {"shortcut_levels": -1},
        {"mlp_ratio": 0},
        {"nope": 1},
    ],
)
def test_head_config_validates(bad: dict) -> None:
    with pytest.raises(ValueError):
        DiffusionHeadConfig.from_any(bad)


@pytest.mark.parametrize(
    "bad", [{"samples_per_position": 0}, {"time_sampling": "cosine"}, {"shortcut_fraction": 1.0}, {"x": 1}]
)
def test_flow_config_validates(bad: dict) -> None:
    with pytest.raises(ValueError):
        FlowLossConfig.from_any(bad)


def test_timestep_embedding_is_cos_sin() -> None:
    t = torch.tensor([0.0, 0.3])
    emb = timestep_embedding(t, 8, scale=10.0)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = 10000.0 ** (-torch.arange(4) / 4)
    torch.testing.assert_close(emb[1, :4], torch.cos(3.0 * freqs))


# ----------------------------------------------------------------------------- loss pieces
def test_interpolation_and_time_sampling() -> None:
    x0, x1 = torch.zeros(3, 2), torch.ones(3, 2)
    torch.testing.assert_close(
        interpolate(x0, x1, torch.tensor([0.0, 0.25, 1.0]))[:, 0], torch.tensor([0, 0.25, 1.0])
    )
    g = torch.Generator().manual_seed(0)
    t = sample_times(20000, FlowLossConfig(time_sampling="logit_normal"), g)
    assert 0 < t.min() and t.max() < 1 and abs(t.median().item() - 0.5) < 0.02
    assert abs(t.std().item() - 0.21) < 0.02  # logit-normal(0, 1) is concentrated around 0.5 (U(0,1): 0.29)


def test_shortcut_steps_lie_on_the_grid() -> None:
    t, d = sample_shortcut_steps(5000, 7, torch.Generator().manual_seed(0))
    assert set((1 / d).round().long().tolist()) == {2, 4, 8, 16, 32, 64, 128}
    assert ((t + 2 * d) <= 1 + 1e-6).all() and (t >= 0).all()
    steps = t / d
    torch.testing.assert_close(steps, steps.round())  # t = i·d
    assert (t[d == 0.5] == 0).all() and (t[d == 1 / 128] > 0.5).any()


def test_flow_loss_targets_and_parts() -> None:
    """With a head that outputs 0, the flow rows' loss is exactly mean ‖x1 − x0‖² and the shortcut
    rows' target is 0 (the teacher is the same zero head)."""
    head = DiffusionHead(2, 3, {"width": 8, "depth": 1, "frequency_dim": 8})
    cond, x1 = torch.randn(6, 3), torch.randn(6, 2)
    out = flow_matching_loss(
        head, cond, x1, FlowLossConfig(samples_per_position=2, shortcut_fraction=0.25), None
    )
    assert out.shortcut.item() == 0.0 and out.flow.item() > 0
    torch.testing.assert_close(out.loss, out.flow * 9 / 12)  # 3 of the 12 rows are shortcut rows (loss 0)
    g = torch.Generator().manual_seed(3)
    plain = flow_matching_loss(
        head, cond, x1, FlowLossConfig(samples_per_position=1, shortcut_fraction=0.0), g
    )
    g = torch.Generator().manual_seed(3)
    x1_rep = x1.float()
    x0 = torch.randn(x1_rep.shape, generator=g)
    perm = torch.randperm(6, generator=g)
    torch.testing.assert_close(plain.flow, (x1_rep[perm] - x0[perm]).pow(2).mean())


def test_flow_loss_empty_batch_touches_every_parameter() -> None:
    head = DiffusionHead(2, 3, {"width": 8, "depth": 1, "frequency_dim": 8})
    out = flow_matching_loss(head, torch.zeros(0, 3), torch.zeros(0, 2), FlowLossConfig())
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in head.parameters())


def test_flow_loss_decreases() -> None:
    _, losses = train_head(80, seed=1, width=32)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


# ----------------------------------------------------------------------------- trained toy
def test_conditional_samples_are_at_the_selected_mode(toy_head: DiffusionHead) -> None:
    g = torch.Generator().manual_seed(1)
    for k in range(4):
        samples = sample_flow(toy_head, one_hot(k, 200), 8, generator=g)
        close, near = (
            near_fraction(samples, MODES[k : k + 1], 0.5),
            near_fraction(samples, MODES[k : k + 1], 1.0),
        )
        assert close >= 0.8 and near >= 0.95, (k, close, near)  # the other modes are >= 4 away


def test_unconditional_samples_cover_every_mode(toy_head: DiffusionHead) -> None:
    samples = sample_flow(toy_head, one_hot(UNCOND, 400), 8, generator=torch.Generator().manual_seed(2))
    dist = torch.cdist(samples, MODES)  # (400, 4)
    near = dist.min(dim=1).values < 1.0
    assert near.float().mean() >= 0.7
    counts = torch.bincount(dist.argmin(dim=1)[near], minlength=4)
    assert (counts >= 40).all(), counts.tolist()  # every mode gets at least 10% of the samples


def test_cfg_sharpens_toward_the_condition(toy_head: DiffusionHead) -> None:
    g = torch.Generator().manual_seed(3)
    uncond = one_hot(UNCOND, 1)
    for k in range(4):
        guided = sample_flow(toy_head, one_hot(k, 200), 4, guidance_scale=3.0, uncond=uncond, generator=g)
        assert near_fraction(guided, MODES[k : k + 1], 0.5) >= 0.95


def test_shortcut_one_step_agrees_with_eight_steps(toy_head: DiffusionHead) -> None:
    """From the same noise, the 1-step shortcut sample lands close to the 8-step one, unconditionally
    too (where a 1-step Euler step of the plain flow (d = 0) lands between the modes)."""
    noise = torch.randn(400, 2, generator=torch.Generator().manual_seed(4))
    for k in (0, UNCOND):
        cond = one_hot(k, 400)
        eight = sample_flow(toy_head, cond, 8, noise=noise)
        one = sample_flow(toy_head, cond, 1, noise=noise)
        flow_one = sample_flow(toy_head, cond, 1, noise=noise, shortcut=False)
        gap = (one - eight).norm(dim=1).mean().item()
        flow_gap = (flow_one - eight).norm(dim=1).mean().item()
        assert gap < 0.8, (k, gap)
        if k == UNCOND:
            assert gap < 0.5 * flow_gap, (gap, flow_gap)
    two = sample_flow(toy_head, one_hot(UNCOND, 400), 2, noise=noise)
    assert (two - eight).norm(dim=1).mean() < 0.6


def test_heun_and_long_euler_agree(toy_head: DiffusionHead) -> None:
    noise = torch.randn(200, 2, generator=torch.Generator().manual_seed(5))
    cond = one_hot(2, 200)
    heun = sample_flow(toy_head, cond, 8, method="heun", noise=noise, shortcut=False)
    euler = sample_flow(toy_head, cond, 64, noise=noise, shortcut=False)
    assert (heun - euler).norm(dim=1).mean() < 0.1
    assert near_fraction(heun, MODES[2:3], 0.5) >= 0.9
