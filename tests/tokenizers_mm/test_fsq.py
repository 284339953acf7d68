"""FSQ: agreement with vector-quantize-pytorch, exact index<->code round trips, straight-through
gradients, float32 quantization under autocast."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizers_mm.fsq import (
    FSQ,
    TILE,
    _bound_constants,
    code_usage_metrics,
    fsq_bound,
    fsq_codes_to_indices,
    fsq_indices_to_codes,
    fsq_quantize,
    round_ste,
)

LEVEL_SETS = [[8, 5, 5, 5], [8, 6, 5], [7, 5, 5, 5, 5], [8, 8, 8, 5, 5, 5], [4, 3, 6, 7], [3, 16, 2]]
# vector-quantize-pytorch refuses a level of 2 unless preserve_symmetry (a different bound) is on.
REFERENCE_LEVEL_SETS = [lv for lv in LEVEL_SETS if 2 not in lv]


def _z(levels: list[int], n: int = 4096, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, len(levels), generator=g) * scale  # (b, n, d)


def _preimage(codes: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """An input z whose bound b(z) is exactly the grid value of ``codes``: the inverse of b."""
    half, offset, shift = _bound_constants(torch.tensor(levels, dtype=torch.int32))
    return torch.atanh((codes * (torch.tensor(levels) // 2) + offset) / half) - shift


@pytest.mark.parametrize("levels", REFERENCE_LEVEL_SETS, ids=str)
def test_matches_vector_quantize_pytorch(levels):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    ref = vqp.FSQ(levels)  # dim defaults to len(levels): no projections
    # The reference's defaults must be the plain FSQ bound of DESIGN §1.
    assert not ref.has_projections and not ref.preserve_symmetry and not ref.bound_hard_clamp
    assert ref.scale is None and ref.noise_dropout == 0 and not ref.orthogonal_rotation
    z = _z(levels)
    ref_codes, ref_indices = ref(z)
    out = FSQ(levels)(z)
    assert torch.equal(out.quantized, ref_codes)
    assert torch.equal(out.indices, ref_indices.long())
    assert torch.equal(fsq_quantize(z, levels), ref_codes)
    # The whole implicit codebook, in index order.
    all_codes = fsq_indices_to_codes(torch.arange(math.prod(levels)), levels)
    assert torch.equal(all_codes, ref.implicit_codebook)


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_module_equals_pure_functions(levels):
    z = _z(levels, scale=3.0)
    out = FSQ(levels)(z)
    codes = fsq_quantize(z, levels)
    assert torch.equal(out.quantized, codes)
    assert torch.equal(out.indices, fsq_codes_to_indices(codes, levels))
    assert out.indices.dtype == torch.long and out.indices.shape == z.shape[:-1]
    assert out.loss.shape == () and out.loss.item() == 0.0


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_bound_is_zero_at_zero(levels):
    b = fsq_bound(torch.zeros(len(levels)), levels)
    for level, value in zip(levels, b.tolist()):
        if level % 2:
            assert value == 0.0  # shift = 0: exact
        else:
            assert abs(value) < 1e-6 * level  # tanh(atanh(x)) in float32: within an ulp or two
    assert torch.equal(fsq_quantize(torch.zeros(len(levels)), levels), torch.zeros(len(levels)))


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_code_levels(levels):
    """Odd L gives symmetric codes, even L gives {-L/2 ... L/2-1}/(L/2)."""
    codes = fsq_quantize(_z(levels, scale=5.0), levels).reshape(-1, len(levels))  # (n, d)
    for i, level in enumerate(levels):
        h = level // 2
        expected = torch.arange(-h, h + 1 if level % 2 else h, dtype=torch.float32) / h
        assert torch.equal(codes[:, i].unique(), expected)


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_whole_codebook_round_trip(levels):
    fsq = FSQ(levels)
    assert fsq.codebook_size == math.prod(levels)
    idx = torch.arange(fsq.codebook_size)
    codes = fsq.indices_to_codes(idx)  # (K, d)
    assert codes.unique(dim=0).shape[0] == fsq.codebook_size
    assert codes.abs().max() <= 1.0
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    assert torch.equal(fsq_codes_to_indices(fsq_indices_to_codes(idx, levels), levels), idx)
    # Every grid point is a fixed point of the quantizer (code -> pre-image -> same code).
    out = fsq(_preimage(codes, levels))
    assert torch.equal(out.indices, idx)


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_indices_in_range_for_extreme_inputs(levels):
    fsq = FSQ(levels)
    d = len(levels)
    z = torch.cat([_z(levels, scale=100.0), torch.full((2, 1, d), 1e6), torch.full((2, 1, d), -1e6)], dim=1)
    out = fsq(z)
    assert out.indices.min() >= 0 and out.indices.max() < fsq.codebook_size
    assert out.indices.max() == fsq.codebook_size - 1 and out.indices.min() == 0
    assert torch.equal(fsq.codes_to_indices(out.quantized), out.indices)


def test_large_codebook_uses_exact_integer_indices():
    levels = [8] * 9  # 2**27 codes: beyond float32's exact integers
    z = _z(levels, n=256, scale=3.0)
    out = FSQ(levels)(z)
    assert torch.equal(out.indices, fsq_codes_to_indices(out.quantized, levels))
    assert torch.equal(FSQ(levels).indices_to_codes(out.indices), out.quantized)


def test_round_ste_value_and_gradient():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 10
    x.requires_grad_(True)
    y = round_ste(x)
    assert torch.equal(y, x + (torch.round(x) - x).detach())
    (y * torch.arange(1000.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(1000.0))


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [7, 6, 3]], ids=str)
def test_straight_through_gradient_is_bound_derivative(levels):
    z = _z(levels, n=512).requires_grad_(True)
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    (FSQ(levels)(z).quantized * g).sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    (fsq_bound(z_ref, levels) / (torch.tensor(levels) // 2) * g).sum().backward()
    assert z.grad.abs().min() > 0
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-5, atol=1e-7)
    # The pure function has the same gradient.
    z_pure = z.detach().clone().requires_grad_(True)
    (fsq_quantize(z_pure, levels) * g).sum().backward()
    torch.testing.assert_close(z_pure.grad, z_ref.grad, rtol=1e-5, atol=1e-7)


def test_float32_under_autocast():
    levels = [8, 5, 5, 5]
    fsq = FSQ(levels)
    z = _z(levels, scale=3.0)
    expected = fsq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fsq(z)
        out_bf16 = fsq(z.bfloat16())
    assert out.quantized.dtype == torch.float32 and torch.equal(out.quantized, expected.quantized)
    # bf16 input: quantized in float32 (as fp32 quantization of the bf16 values), cast back to bf16.
    assert out_bf16.quantized.dtype == torch.bfloat16
    assert torch.equal(out_bf16.indices, fsq(z.bfloat16().float()).indices)
    # Quantizing in bf16 would move many codes: the check above could fail.
    bf16_codes = fsq_quantize(z.bfloat16(), levels)
    assert not torch.equal(fsq_codes_to_indices(bf16_codes.float(), levels), out_bf16.indices)


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\).*project"):
        FSQ([8, 5, 5, 5])(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=">= 2"):
        FSQ([8, 1, 5])
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        FSQ([10, 10, 10]).indices_to_codes(torch.tensor([1000]))


def test_metrics_usage_and_perplexity():
    fsq = FSQ([8, 5, 5, 5])
    codes = fsq.indices_to_codes(torch.tensor([0, 0, 7, 7]))  # two codes, equally often
    out = fsq(_preimage(codes, [8, 5, 5, 5]))
    assert out.metrics["usage"] == pytest.approx(2 / 1000)
    assert out.metrics["perplexity"] == pytest.approx(2.0)
    assert code_usage_metrics(torch.arange(1000), 1000) == pytest.approx(
        {"usage": 1.0, "perplexity": 1000.0}, rel=1e-5
    )
    # A codebook much larger than the batch takes the sparse (unique) path: same numbers.
    sparse = code_usage_metrics(torch.tensor([5, 5, 9, 2**30]), 2**31)
    assert sparse == pytest.approx(
        {"usage": 3 / 2**31, "perplexity": math.exp(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))}
    )


def test_no_state_and_dtype_moves():
    with torch.device("meta"):  # how transformers >= 5 builds models before loading weights
        FSQ([8, 5, 5, 5])
    fsq = FSQ([8, 5, 5, 5])
    assert fsq.state_dict() == {}  # the derived constants are rebuilt from `levels`, never saved
    z = _z([8, 5, 5, 5])
    expected = fsq(z)
    # Casting the module (e.g. a bf16 pipeline) must not round the constants: same codes for fp32 input.
    assert torch.equal(fsq.to(torch.bfloat16)(z).quantized, expected.quantized)
    out64 = fsq.double()(z.double())
    assert out64.quantized.dtype == torch.float64
    assert torch.equal(
        out64.indices, fsq_codes_to_indices(fsq_quantize(z.double(), [8, 5, 5, 5]), [8, 5, 5, 5])
    )


def test_fast_paths_agree_with_fallbacks():
    levels = [8, 6, 5]
    fsq = FSQ(levels)
    z = _z(levels, n=TILE * 8, scale=3.0)  # tiled view + block-diagonal index matmul
    out = fsq(z)
    codes = fsq_quantize(z, levels)
    assert torch.equal(out.quantized, codes) and torch.equal(out.indices, fsq_codes_to_indices(codes, levels))
    odd = z[:, :-1]  # n not a multiple of TILE: per-channel broadcast + mv
    assert torch.equal(fsq(odd).indices, out.indices[:, :-1])
    permuted = z.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous input
    assert torch.equal(fsq(permuted).indices, out.indices)
    previous = torch.get_float32_matmul_precision()
    try:  # reduced-precision matmul (bf16/TF32 internals) -> exact int64 index arithmetic instead
        torch.set_float32_matmul_precision("medium")
        assert torch.equal(fsq(z).indices, out.indices)
    finally:
        torch.set_float32_matmul_precision(previous)
    z.requires_grad_(True)
    fsq(z).quantized.sum().backward()
    z_odd = odd.detach().clone().requires_grad_(True)
    fsq(z_odd).quantized.sum().backward()
    torch.testing.assert_close(z_odd.grad, z.grad[:, :-1])


@settings(max_examples=60, deadline=None)
@given(
    levels=st.lists(st.integers(2, 17), min_size=1, max_size=6),
    data=st.data(),
)
def test_round_trip_property(levels, data):
    size = math.prod(levels)
    raw = data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=64))
    idx = torch.tensor(raw).reshape(-1, 1)  # (n, 1): any leading shape works
    codes = fsq_indices_to_codes(idx, levels)
    assert codes.shape == (*idx.shape, len(levels))
    assert torch.equal(fsq_codes_to_indices(codes, levels), idx)
    fsq = FSQ(levels)
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(idx)), idx)
    # Quantized codes from random inputs round-trip the other way: code -> index -> code.
    z = torch.randn(16, len(levels), generator=torch.Generator().manual_seed(len(raw))) * 3
    out = fsq(z)
    assert torch.equal(fsq.indices_to_codes(out.indices), out.quantized)


def test_entropy_loss_prefers_spread_confident_codes():
    from tokenizers_mm.fsq import fsq_entropy_loss

    levels = [8, 5, 5, 5]
    g = torch.Generator().manual_seed(0)
    collapsed = torch.zeros(4096, 4)
    # Inputs whose bounded values sit on every integer level uniformly: confident and spread.
    target = torch.stack(
        [torch.randint(-(L // 2), (L - 1) // 2 + 1, (4096,), generator=g) for L in levels], -1
    )
    half = torch.tensor([(L - 1) * (1 + 1e-3) / 2 for L in levels])
    offset = torch.tensor([0.5 if L % 2 == 0 else 0.0 for L in levels])
    shift = torch.atanh(offset / half)
    spread = torch.atanh((target + offset) / half) - shift
    assert torch.allclose(fsq_bound(spread, levels), target.float(), atol=1e-4)
    assert fsq_entropy_loss(spread, levels) < fsq_entropy_loss(collapsed, levels) - 0.5
    z = torch.randn(256, 4, generator=g).requires_grad_(True)
    fsq_entropy_loss(z, levels).backward()
    assert z.grad.abs().sum() > 0


def test_entropy_weight_adds_loss_only_in_training():
    q = FSQ([8, 5, 5, 5], entropy_weight=0.1)
    z = torch.randn(2, 16, 4, requires_grad=True)
    assert q.train()(z).loss.item() != 0
    assert q.eval()(z).loss.item() == 0
    assert FSQ([8, 5, 5, 5])(z).loss.item() == 0


def test_joint_entropy_loss_is_minus_the_code_histogram_entropy_at_low_temperature():
    """As the soft assignment hardens, E[H(q)] → 0 and H(E[q]) → the entropy of the FSQ code
    histogram of the batch: the joint penalty measures usage of whole codes."""
    from tokenizers_mm.fsq import fsq_joint_entropy_loss

    levels = [4, 3, 5]
    fsq = FSQ(levels)
    torch.manual_seed(0)
    z = torch.randn(3000, 3) * 2
    indices = fsq(z).indices
    counts = torch.bincount(indices, minlength=fsq.codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    loss = fsq_joint_entropy_loss(z, levels, temperature=1e-4)
    torch.testing.assert_close(loss.double(), -entropy / math.log(fsq.codebook_size), atol=2e-3, rtol=0)
    # A batch collapsed onto one code has zero batch entropy, so a higher (worse) penalty.
    collapsed = fsq_joint_entropy_loss(torch.zeros(3000, 3), levels, temperature=1e-4)
    assert collapsed > loss + 0.5


@pytest.mark.parametrize("levels", [[7], [8, 5], [4, 3, 5], [8, 5, 5, 5], [3, 4, 2, 5, 3]])
def test_joint_entropy_loss_equals_the_explicit_joint_distribution(levels):
    """The factorized batch marginal (``aᵀb / n``) gives the loss and gradient of the penalty written
    out over the full ``(n, prod(levels))`` matrix of joint soft assignments."""
    from tokenizers_mm.fsq import fsq_bound, fsq_joint_entropy_loss

    def explicit(z, temperature=0.5):
        bounded = fsq_bound(z.double(), levels, 1e-3).reshape(-1, len(levels))  # (n, d)
        ps = []
        for i, level in enumerate(levels):
            grid = torch.arange(level, dtype=torch.float64) - level // 2
            ps.append((-(bounded[:, i : i + 1] - grid).pow(2) / temperature).softmax(-1))  # (n, L)
        letters = "abcdefgh"[: len(levels)]
        q = torch.einsum(",".join(f"n{c}" for c in letters) + f"->n{letters}", *ps).flatten(1)  # (n, K)
        per_vector = -(q * q.clamp_min(1e-300).log()).sum(-1).mean()
        marginal = q.mean(0)
        batch = -(marginal * marginal.clamp_min(1e-12).log()).sum()
        return (per_vector - batch) / math.log(math.prod(levels))

    torch.manual_seed(len(levels))
    z = (torch.randn(300, len(levels), dtype=torch.float64) * 1.5).requires_grad_()
    ours = fsq_joint_entropy_loss(z, levels, eps=1e-3)
    (grad,) = torch.autograd.grad(ours, z)
    ref = explicit(z)
    (ref_grad,) = torch.autograd.grad(ref, z)
    # ours runs in float32 (as in training), the reference in float64
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-7, rtol=1e-4)


def test_joint_entropy_mode_trains_through_the_bottleneck():
    fsq = FSQ([8, 5, 5, 5], entropy_weight=0.1, entropy_mode="joint").train()
    z = torch.randn(2, 16, 4, requires_grad=True)
    out = fsq(z)
    assert out.loss > -0.2 and out.loss.requires_grad
    out.loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="entropy_mode"):
        FSQ([8, 5], entropy_mode="codes")
