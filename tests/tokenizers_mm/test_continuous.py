"""Continuous bottleneck: KL against the closed form, deterministic eval, seeded sampling, and
streaming latent statistics."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from tokenizers_mm.continuous import (
    ContinuousBottleneck,
    denormalize_latents,
    gaussian_kl,
    latent_stats,
    normalize_latents,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _posterior(c: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = torch.randn(2, 5, 5, c, generator=_gen(seed))
    logvar = torch.randn(2, 5, 5, c, generator=_gen(seed + 1)) - 1
    return torch.cat([mean, logvar], dim=-1), mean, logvar  # (b, h, w, 2c)


def test_kl_matches_closed_form():
    z, mean, logvar = _posterior()
    bn = ContinuousBottleneck(4, kind="kl", kl_weight=0.5)
    assert bn.in_dim == 8
    out = bn(z, sample=False)
    md, lv = mean.double(), logvar.double()
    closed = (0.5 * (md**2 + lv.exp() - 1 - lv)).mean()
    reference = kl_divergence(Normal(md, (0.5 * lv).exp()), Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(closed, reference)
    torch.testing.assert_close(out.loss.double(), 0.5 * closed, rtol=1e-6, atol=0)
    assert out.metrics["kl"] == pytest.approx(closed.item(), rel=1e-6)
    assert out.indices is None
    torch.testing.assert_close(gaussian_kl(torch.zeros(3), torch.zeros(3)), torch.zeros(3))


def test_eval_is_deterministic_mean():
    z, mean, _ = _posterior()
    bn = ContinuousBottleneck(4).eval()
    a, b = bn(z), bn(z)
    assert torch.equal(a.quantized, mean) and torch.equal(b.quantized, mean)
    assert torch.equal(bn.deterministic(z), mean)
    assert a.quantized.shape == (2, 5, 5, 4)


def test_training_sampling_is_reparameterized_and_seeded():
    z, mean, logvar = _posterior(c=8)
    bn = ContinuousBottleneck(8).train()
    a = bn(z, generator=_gen(1)).quantized
    b = bn(z, generator=_gen(1)).quantized
    c = bn(z, generator=_gen(2)).quantized
    assert torch.equal(a, b) and not torch.equal(a, c)
    # (sample - mean) / std is the generator's standard normal draw.
    eps = torch.randn(mean.shape, generator=_gen(1))
    torch.testing.assert_close((a - mean) / (0.5 * logvar).exp(), eps, rtol=1e-4, atol=1e-5)


def test_noise_bottleneck():
    bn = ContinuousBottleneck(4, kind="noise", noise_std=0.5)
    assert bn.in_dim == 4
    z = torch.randn(64, 16, 4, generator=_gen(3))
    bn.eval()
    out = bn(z)
    assert torch.equal(out.quantized, z) and out.loss.item() == 0.0 and out.indices is None
    bn.train()
    noisy = bn(z, generator=_gen(4)).quantized
    assert (noisy - z).std().item() == pytest.approx(0.5, rel=0.05)
    assert torch.equal(noisy, bn(z, generator=_gen(4)).quantized)
    l2 = ContinuousBottleneck(4, kind="noise", latent_l2_weight=0.1)(z, sample=False).loss
    torch.testing.assert_close(l2, 0.1 * z.square().mean())


@pytest.mark.parametrize("kind", ["kl", "noise"])
def test_gradients_reach_input(kind):
    bn = ContinuousBottleneck(4, kind=kind, kl_weight=1.0).train()
    z = torch.randn(3, 2, 2, bn.in_dim, requires_grad=True)
    out = bn(z, generator=_gen(5))
    (out.quantized.square().sum() + out.loss).backward()
    assert z.grad.abs().min() > 0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\).*mean and logvar"):
        ContinuousBottleneck(4, kind="kl")(torch.randn(2, 4))
    with pytest.raises(ValueError, match="kind"):
        ContinuousBottleneck(4, kind="vae")


def test_latent_stats_match_concatenation():
    g = _gen(6)
    scale = torch.tensor([1.0, 0.01, 5.0])
    batches = [torch.randn(n, 3, generator=g) * scale + 100.0 for n in (1, 7, 300, 64)]
    mean, std = latent_stats(iter(batches))
    cat = torch.cat(batches).double()
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), cat.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), cat.std(0), rtol=1e-9, atol=1e-12)
    # Channel-first batches (b, c, h, w) with channel_dim=1.
    images = [torch.randn(2, 3, 4, 4, generator=g) + torch.arange(3.0).view(1, 3, 1, 1) for _ in range(3)]
    m2, s2 = latent_stats(images, channel_dim=1)
    flat = torch.cat(images).permute(0, 2, 3, 1).reshape(-1, 3).double()
    torch.testing.assert_close(torch.tensor(m2, dtype=torch.float64), flat.mean(0))
    torch.testing.assert_close(torch.tensor(s2, dtype=torch.float64), flat.std(0))
    with pytest.raises(ValueError, match="at least two"):
        latent_stats([torch.zeros(1, 3)])


def test_normalize_denormalize_inverse():
    x = torch.randn(4, 6, 6, 3, generator=_gen(7)) * torch.tensor([2.0, 0.5, 3.0]) + torch.tensor(
        [1.0, -2.0, 0.0]
    )
    mean, std = latent_stats([x])
    n = normalize_latents(x, mean, std)
    torch.testing.assert_close(n.reshape(-1, 3).mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.reshape(-1, 3).std(0), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(denormalize_latents(n, mean, std), x, atol=1e-5, rtol=1e-6)
    xc = x.permute(0, 3, 1, 2)  # (b, c, h, w)
    torch.testing.assert_close(normalize_latents(xc, mean, std, channel_dim=1), n.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="3 channels"):
        normalize_latents(x, [0.0, 0.0], [1.0, 1.0])
