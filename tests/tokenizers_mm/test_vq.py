"""VectorQuantizer: rotation-trick value and Jacobian, STE, nearest-code lookup, EMA, k-means init,
dead-code restart, usage bookkeeping, save/load, and the distributed code path (gloo)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

import tokenizers_mm.vq as vq_module
from tokenizers_mm.vq import VectorQuantizer, ema_codebook, kmeans, nearest_code, rotation_trick, ste


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clusters(n_per: int, centers: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """Gaussian blobs around each center (k, d) -> (k * n_per, d), shuffled."""
    g = _gen(seed)
    x = centers.repeat_interleave(n_per, 0) + std * torch.randn(
        centers.shape[0] * n_per, centers.shape[1], generator=g
    )
    return x[torch.randperm(x.shape[0], generator=g)]


# ----------------------------------------------------------------------------- rotation trick / STE
def test_rotation_trick_forward_value_is_q():
    z = torch.randn(256, 8, generator=_gen(0)) * 3
    q = torch.randn(256, 8, generator=_gen(1)) * 0.5
    torch.testing.assert_close(rotation_trick(z, q), q, atol=1e-5, rtol=0)
    # Without the detached correction the plain formula already gives q in general position.
    z_hat, q_hat, r, scale = _rotation_quantities(z, q)
    plain = scale * (
        z - 2 * (z * r).sum(-1, keepdim=True) * r + 2 * (z * z_hat).sum(-1, keepdim=True) * q_hat
    )
    torch.testing.assert_close(plain.float(), q, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotation_trick(z, -z * 0.3), -z * 0.3, atol=1e-5, rtol=0)  # antiparallel


def _rotation_quantities(z: torch.Tensor, q: torch.Tensor):
    z, q = z.double(), q.double()
    z_hat = z / z.norm(dim=-1, keepdim=True)
    q_hat = q / q.norm(dim=-1, keepdim=True)
    r = (z_hat + q_hat) / (z_hat + q_hat).norm(dim=-1, keepdim=True)
    scale = q.norm(dim=-1, keepdim=True) / z.norm(dim=-1, keepdim=True)
    return z_hat, q_hat, r, scale


def test_rotation_trick_gradient_matches_formula_and_jacobian():
    z = (torch.randn(64, 6, generator=_gen(2)) * 2).requires_grad_(True)
    q = torch.randn(64, 6, generator=_gen(3))
    g = torch.randn(64, 6, generator=_gen(4))
    (rotation_trick(z, q) * g).sum().backward()

    z_hat, q_hat, r, scale = _rotation_quantities(z.detach(), q)
    gd = g.double()
    formula = scale * (
        gd - 2 * (gd * r).sum(-1, keepdim=True) * r + 2 * (gd * q_hat).sum(-1, keepdim=True) * z_hat
    )
    torch.testing.assert_close(z.grad.double(), formula, rtol=1e-5, atol=1e-6)

    # Explicit Jacobian of the linear map z -> s (I - 2 r rᵀ + 2 q̂ ẑᵀ) z; the gradient is Jᵀ g.
    eye = torch.eye(6, dtype=torch.float64)
    rot = (
        eye - 2 * r.unsqueeze(-1) * r.unsqueeze(-2) + 2 * q_hat.unsqueeze(-1) * z_hat.unsqueeze(-2)
    )  # (n, d, d)
    jac = scale.unsqueeze(-1) * rot
    torch.testing.assert_close(
        z.grad.double(), (jac.transpose(-1, -2) @ gd.unsqueeze(-1)).squeeze(-1), rtol=1e-5, atol=1e-6
    )
    # It is a rotation taking ẑ to q̂: orthogonal, det +1.
    torch.testing.assert_close(rot @ rot.transpose(-1, -2), eye.expand_as(rot), atol=1e-9, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(64, dtype=torch.float64))
    torch.testing.assert_close((rot @ z_hat.unsqueeze(-1)).squeeze(-1), q_hat)
    # ... and it is not the straight-through gradient.
    assert (z.grad - g).abs().max() > 0.1


def test_rotation_trick_equals_ste_when_q_equals_z():
    z = torch.randn(32, 5, generator=_gen(5)).requires_grad_(True)
    g = torch.randn(32, 5, generator=_gen(6))
    (rotation_trick(z, z.detach().clone()) * g).sum().backward()
    torch.testing.assert_close(z.grad, g, atol=1e-5, rtol=1e-5)


def test_ste_value_and_gradient():
    z = torch.randn(10, 4, requires_grad=True)
    q = torch.randn(10, 4)
    out = ste(z, q)
    torch.testing.assert_close(out, q, atol=1e-6, rtol=0)
    out.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


# ----------------------------------------------------------------------------- nearest code
@pytest.mark.parametrize("chunk", [None, 50])
def test_nearest_code_matches_brute_force(monkeypatch, chunk):
    if chunk is not None:  # force several row chunks (rows = chunk // k)
        monkeypatch.setattr(vq_module, "_CHUNK_ELEMENTS", chunk * 16)
    z = torch.randn(300, 8, generator=_gen(7))
    cb = torch.randn(16, 8, generator=_gen(8))
    assert torch.equal(nearest_code(z, cb, "l2"), torch.cdist(z.double(), cb.double()).argmin(1))
    zn, cbn = F.normalize(z, dim=-1), F.normalize(cb, dim=-1)
    assert torch.equal(nearest_code(zn, cbn, "cosine"), (zn.double() @ cbn.double().t()).argmax(1))


# ----------------------------------------------------------------------------- module basics
@pytest.mark.parametrize("gradient", ["ste", "rotation"])
@pytest.mark.parametrize("ema", [True, False])
def test_forward_shapes_loss_and_gradients_reach_input(gradient, ema):
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 8, gradient=gradient, ema=ema, kmeans_init=False)
    z = torch.randn(2, 4, 4, 8, generator=_gen(9), requires_grad=True)
    out = vq(z, update_codebook=False)
    assert (
        out.quantized.shape == z.shape and out.indices.shape == (2, 4, 4) and out.indices.dtype == torch.long
    )
    q = vq.indices_to_codes(out.indices)
    torch.testing.assert_close(out.quantized, q, atol=1e-5, rtol=0)
    commit = F.mse_loss(z, q)
    expected = 0.25 * commit if ema else 1.25 * commit
    torch.testing.assert_close(out.loss, expected)
    (out.quantized.square().sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    if ema:
        assert not any(p.requires_grad for p in vq.parameters())
    else:
        assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0  # codebook loss


def test_builds_on_meta_device():
    with torch.device("meta"):  # how transformers >= 5 builds models before loading weights
        vq = VectorQuantizer(16, 4, distance="cosine")
    assert vq.codebook.is_meta


def test_eval_and_update_false_do_not_touch_state():
    vq = VectorQuantizer(16, 4, dead_code_steps=1)
    before = {k: v.clone() for k, v in vq.state_dict().items() if k != "usage_counts"}
    z = torch.randn(64, 4)
    vq.eval()
    vq(z)
    vq.train()
    vq(z, update_codebook=False)
    for k, v in before.items():
        assert torch.equal(vq.state_dict()[k], v), k


def test_codes_to_indices_round_trip():
    for distance in ("l2", "cosine"):
        torch.manual_seed(1)
        vq = VectorQuantizer(64, 8, distance=distance, kmeans_init=False)
        idx = torch.randint(0, 64, (3, 5, 7), generator=_gen(10))
        codes = vq.indices_to_codes(idx)
        assert codes.shape == (3, 5, 7, 8)
        assert torch.equal(vq.codes_to_indices(codes), idx)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        vq.indices_to_codes(torch.tensor([64]))
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        vq(torch.randn(2, 7))


@pytest.mark.parametrize("ema", [True, False])
def test_cosine_distance(ema):
    torch.manual_seed(2)
    vq = VectorQuantizer(16, 6, distance="cosine", ema=ema, kmeans_init=True, gradient="rotation")
    z = (torch.randn(128, 6, generator=_gen(11)) * 4).requires_grad_(True)
    out = vq(z, generator=_gen(12))
    torch.testing.assert_close(out.quantized.norm(dim=-1), torch.ones(128), atol=1e-5, rtol=0)
    cb = F.normalize(vq.codebook.detach(), dim=-1) if not ema else vq.codebook
    torch.testing.assert_close(cb.norm(dim=-1), torch.ones(16), atol=1e-5, rtol=0)
    vq.eval()
    out = vq(z)
    expected = (F.normalize(z.detach(), dim=-1) @ cb.t()).argmax(1)
    assert torch.equal(out.indices, expected)
    out.quantized.sum().backward()
    assert z.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- training updates
def test_ema_pure_update_with_laplace_smoothing():
    cluster_size = torch.tensor([1.0, 1.0])
    embed_sum = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    counts = torch.tensor([3.0, 0.0])
    sums = torch.tensor([[3.0, 6.0], [0.0, 0.0]])
    cb = ema_codebook(cluster_size, embed_sum, counts, sums, decay=0.5, eps=0.1)
    assert torch.equal(cluster_size, torch.tensor([2.0, 0.5]))
    assert torch.equal(embed_sum, torch.tensor([[1.5, 3.0], [1.0, 1.0]]))
    smoothed = (torch.tensor([2.0, 0.5]) + 0.1) / (2.5 + 2 * 0.1) * 2.5
    torch.testing.assert_close(cb, embed_sum / smoothed[:, None])


def test_ema_moves_codes_toward_data():
    centers = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    vq = VectorQuantizer(2, 2, kmeans_init=False, decay=0.8, dead_code_steps=0)
    start = torch.tensor([[-1.0, 1.0], [1.0, -1.0]])
    vq.codebook.copy_(start)
    vq.embed_sum.copy_(start)
    vq.train()
    for step in range(30):
        vq(_clusters(64, centers, 0.1, seed=step))
    assert (vq.codebook - centers).norm(dim=1).max() < 0.1
    assert (start - centers).norm(dim=1).min() > 2


def test_kmeans_init_beats_random_init():
    centers = torch.randn(8, 8, generator=_gen(13)) * 5
    data = _clusters(128, centers, 0.3, seed=14)
    errors = {}
    for init in (True, False):
        torch.manual_seed(3)
        vq = VectorQuantizer(16, 8, kmeans_init=init, dead_code_steps=0)
        vq(data, update_codebook=True, generator=_gen(15))  # k-means runs on this first batch
        vq.eval()
        errors[init] = F.mse_loss(vq(data).quantized, data).item()
    assert bool(vq.initialized)
    assert errors[True] < 0.2 * errors[False]
    assert errors[True] < 0.5  # close to the within-cluster variance 0.09 (a few merged clusters at worst)


def test_kmeans_is_seeded_and_handles_few_points():
    x = torch.randn(200, 4, generator=_gen(16))
    a, ca = kmeans(x, 8, iters=5, generator=_gen(17))
    b, cb = kmeans(x, 8, iters=5, generator=_gen(17))
    assert torch.equal(a, b) and torch.equal(ca, cb)
    assert ca.sum() == 200
    c, _ = kmeans(
        x[:3], 8, iters=3, generator=_gen(18)
    )  # fewer points than clusters: sampled with replacement
    assert c.shape == (8, 4) and torch.isfinite(c).all()


@pytest.mark.parametrize("ema", [True, False])
def test_dead_codes_are_restarted_near_data(ema):
    torch.manual_seed(4)
    vq = VectorQuantizer(16, 4, ema=ema, kmeans_init=False, dead_code_steps=2)
    codebook = torch.randn(16, 4, generator=_gen(19)) * 0.1
    codebook[4:] += 100.0  # 12 codes far from every data point: never chosen
    with torch.no_grad():
        vq.codebook.copy_(codebook)
        if ema:
            vq.embed_sum.copy_(codebook)
    data = [torch.randn(256, 4, generator=_gen(20 + i)) for i in range(5)]
    vq.eval()
    vq.reset_usage()
    vq(data[0])
    usage_before = vq.usage_stats()["codebook_usage"]
    vq.train()
    restarts = sum(vq(x, generator=_gen(30)).metrics["restarts"] for x in data)
    assert restarts >= 12
    assert vq.codebook[4:].detach().norm(dim=1).max() < 10  # now among the data (|x| ~ 2)
    vq.eval()
    vq.reset_usage()
    vq(data[0])
    assert usage_before == 4 / 16
    assert vq.usage_stats()["codebook_usage"] > 0.9


def test_usage_bookkeeping():
    torch.manual_seed(5)
    vq = VectorQuantizer(8, 2, kmeans_init=False).eval()
    codes = vq.indices_to_codes(torch.tensor([0, 0, 1, 1]))
    out = vq(codes)
    assert out.metrics["usage"] == pytest.approx(2 / 8) and out.metrics["perplexity"] == pytest.approx(2.0)
    vq(vq.indices_to_codes(torch.tensor([2, 3])))
    stats = vq.usage_stats()
    assert stats["codebook_usage"] == pytest.approx(4 / 8)
    p = [2 / 6, 2 / 6, 1 / 6, 1 / 6]
    assert stats["perplexity"] == pytest.approx(math.exp(-sum(pi * math.log(pi) for pi in p)))
    vq.reset_usage()
    assert vq.usage_stats()["codebook_usage"] == 0.0


@pytest.mark.parametrize("ema", [True, False])
def test_state_dict_round_trip_is_bitwise(ema):
    torch.manual_seed(6)
    vq = VectorQuantizer(32, 4, ema=ema, dead_code_steps=1)
    for i in range(3):
        vq(torch.randn(128, 4, generator=_gen(40 + i)) * 2, generator=_gen(50 + i))
    keys = set(vq.state_dict())
    expected = {"codebook", "initialized", "steps_unused"}  # usage_counts is per-process bookkeeping
    expected |= {"cluster_size", "embed_sum"} if ema else set()
    assert keys == expected
    buf = io.BytesIO()
    torch.save(vq.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(7)
    fresh = VectorQuantizer(32, 4, ema=ema, dead_code_steps=1)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for k, v in vq.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v) and fresh.state_dict()[k].dtype == v.dtype, k
    z = torch.randn(64, 4, generator=_gen(60))
    a, b = vq(z, generator=_gen(61)), fresh(z, generator=_gen(61))
    assert torch.equal(a.quantized, b.quantized) and torch.equal(vq.codebook, fresh.codebook)


def test_single_rank_gloo_matches_local(tmp_path):
    """The distributed code path (all-reduce / broadcast) runs and, on one rank, changes nothing."""
    import torch.distributed as dist

    def run():
        torch.manual_seed(8)
        vq = VectorQuantizer(16, 4, dead_code_steps=1)
        outs = [vq(torch.randn(64, 4, generator=_gen(70 + i)), generator=_gen(80 + i)) for i in range(3)]
        return vq.state_dict(), outs[-1].metrics

    local_state, local_metrics = run()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        dist_state, dist_metrics = run()
    finally:
        dist.destroy_process_group()
    assert local_metrics == dist_metrics
    for k, v in local_state.items():
        assert torch.equal(dist_state[k], v), k


def _two_rank_worker(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(9 + rank)  # different random init per rank: k-means init must overwrite it
        vq = VectorQuantizer(16, 4, dead_code_steps=1)
        for i in range(4):  # every rank sees different data
            x = torch.randn(64, 4, generator=_gen(100 * rank + i)) * (1 + rank)
            vq(x, generator=_gen(200 * rank + i))
        stats = vq.usage_stats(all_ranks=True)  # a collective: both ranks call it
        state = {**vq.state_dict(), "usage_counts": vq.usage_counts}
        torch.save({"state": state, "stats": stats}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_keep_identical_codebooks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0["state"]:
        if k != "usage_counts":  # local bookkeeping: each rank counts its own data
            assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert not torch.equal(r0["state"]["usage_counts"], r1["state"]["usage_counts"])
    assert r0["stats"] == r1["stats"]  # ... and usage_stats(all_ranks=True) sums them
