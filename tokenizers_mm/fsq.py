"""Finite Scalar Quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of the d channels is bounded to a small interval and rounded to one of L_i levels; the
codebook is the implicit grid of prod(L_i) points, so there is no codebook loss and nothing can
collapse. The maths lives in pure functions (``fsq_bound``, ``fsq_quantize``,
``fsq_codes_to_indices``, ``fsq_indices_to_codes``); the ``FSQ`` module precomputes the
per-channel constants (per device and dtype) and fuses the hot path into one autograd op.

Shape legend: ``...`` any leading dims (batch, height, width), ``d`` = len(levels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from tokenizers_mm.bottleneck_output import BottleneckOutput

FSQ_EPS = 1e-3


class _RoundSTE(torch.autograd.Function):
    """round() in the forward pass, identity in the backward pass."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # nothing to save: the gradient is the identity
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient: the value of ``x + (round(x) - x).detach()``.

    Implemented as one autograd op (round forward, identity backward) instead of three; the value
    is bitwise the same because ``round(x) - x`` is exact in floating point.
    """
    return _RoundSTE.apply(x)


def _levels_tensor(levels: Sequence[int] | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Levels as an int32 tensor (the dtype the constants are derived in, see ``_bound_constants``)."""
    t = torch.as_tensor(levels, dtype=torch.int32, device=device)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"FSQ levels must be a non-empty 1-D list of ints, got {levels!r}")
    if bool((t < 2).any()):
        raise ValueError(f"every FSQ level must be >= 2, got {t.tolist()}")
    return t


def _bound_constants(
    levels: torch.Tensor, eps: float = FSQ_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(half, offset, shift) of the bound, float32, derived from int32 levels.

    The order of operations (int32 levels, float32 arithmetic) is the one vector-quantize-pytorch
    uses, so that codes agree with it bit for bit.
    """
    half = (levels - 1) * (1 + eps) / 2  # (d,) float32
    offset = torch.where(levels % 2 == 0, 0.5, 0.0).to(half)  # (d,)
    shift = torch.atanh(offset / half)  # (d,)
    return half, offset, shift


def _basis(levels: torch.Tensor) -> torch.Tensor:
    """Mixed-radix place values ``cumprod([1, L_0, ..., L_{d-2}])`` as int64, shape (d,)."""
    ones = torch.ones(1, dtype=torch.int64, device=levels.device)
    return torch.cumprod(torch.cat([ones, levels[:-1].long()]), dim=0)  # (d,)


def fsq_bound(z: torch.Tensor, levels: Sequence[int] | torch.Tensor, eps: float = FSQ_EPS) -> torch.Tensor:
    """The FSQ bound ``b(z) = tanh(z + shift) * half - offset`` (Mentzer et al. 2023, App. A.1).

    ``half = (L-1)(1+eps)/2``, ``offset = 0.5`` for even L else 0, ``shift = atanh(offset/half)``,
    so that ``b(0) = 0`` (exactly in real arithmetic, to an ulp in float32) and ``round(b)`` takes
    L values: symmetric for odd L, ``{-L/2, ..., L/2-1}`` for even L. ``z``: (..., d).
    """
    # Constants derived on the CPU (as the module does), so every device uses the same float32 values.
    lv = _levels_tensor(levels.cpu() if isinstance(levels, torch.Tensor) else levels)
    half, offset, shift = (c.to(z.device, z.dtype) for c in _bound_constants(lv, eps))
    return torch.tanh(z + shift) * half - offset


def fsq_quantize(z: torch.Tensor, levels: Sequence[int] | torch.Tensor, eps: float = FSQ_EPS) -> torch.Tensor:
    """Quantized codes ``round_ste(b(z)) / (L // 2)`` in [-1, 1], straight-through gradient. (..., d)."""
    lv = _levels_tensor(levels, z.device)
    return round_ste(fsq_bound(z, lv, eps)) / (lv // 2).to(z.dtype)


def fsq_codes_to_indices(codes: torch.Tensor, levels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Codes (..., d) -> int64 indices (...): ``sum_i (code_i * (L_i//2) + L_i//2) * basis_i``."""
    lv = _levels_tensor(levels, codes.device)
    if codes.shape[-1] != lv.numel():
        raise ValueError(f"codes have {codes.shape[-1]} channels, levels {lv.tolist()} need {lv.numel()}")
    half_width = (lv // 2).to(codes.dtype)
    digits = torch.round(codes * half_width + half_width).long()  # (..., d), each in [0, L_i)
    return (digits * _basis(lv)).sum(dim=-1)  # (...)


def fsq_indices_to_codes(
    indices: torch.Tensor, levels: Sequence[int] | torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of ``fsq_codes_to_indices``: digit ``(idx // basis_i) % L_i``, code ``(digit - h_i) / h_i``
    with ``h_i = L_i // 2``. indices (...) -> codes (..., d)."""
    lv = _levels_tensor(levels, indices.device)
    digits = (indices.long().unsqueeze(-1) // _basis(lv)) % lv  # (...) -> (..., d)
    half_width = (lv // 2).to(dtype)
    return (digits.to(dtype) - half_width) / half_width  # (..., d)


def code_usage_metrics(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of the codebook used by ``indices`` and the perplexity ``exp(H(p))`` of their histogram."""
    flat = indices.reshape(-1)  # (n,)
    if codebook_size <= 4 * flat.numel():
        return usage_from_counts(torch.bincount(flat, minlength=codebook_size).float())  # (K,) histogram
    # Codebook much larger than the batch: histogram of the codes present only (zeros add nothing).
    counts = torch.unique(flat, return_counts=True)[1].float()  # (m,)
    stats = usage_from_counts(counts)
    stats["usage"] = counts.numel() / codebook_size
    return stats


def usage_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """``{"usage", "perplexity"}`` from a histogram of code counts (K,): the fraction of nonzero
    bins and ``exp(H)`` with ``H = log N - (1/N) Σ c log c`` (N = Σ c); 1 for an empty histogram."""
    counts = counts.double()
    used, total, c_log_c = torch.stack(
        [torch.count_nonzero(counts).double(), counts.sum(), torch.xlogy(counts, counts).sum()]
    ).tolist()
    entropy = math.log(total) - c_log_c / total if total > 0 else 0.0
    return {"usage": used / max(counts.numel(), 1), "perplexity": math.exp(entropy)}


# The module's fast path views TILE consecutive vectors as one row (n, d) -> (n/TILE, TILE*d), so
# per-channel constants broadcast over a wide inner dim (several times faster on CPU than d = 4-6).
TILE = 16


def _exact_float32_matmul(device: torch.device) -> bool:
    """Whether a float32 matmul on ``device`` is IEEE float32 (no TF32/bf16 internals)."""
    if device.type != "cpu" or torch.get_float32_matmul_precision() != "highest":
        return False
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    return getattr(mkldnn_matmul, "fp32_precision", "none") in ("none", "ieee")


class _FusedFSQ(torch.autograd.Function):
    """``fsq_quantize`` in as few kernels as possible; also returns ``round(b(z))`` for the indices.

    Same value as ``round_ste(tanh(z + shift) * half - offset) / half_width`` (the same float ops in
    the same order, so bitwise equal to ``fsq_quantize``); backward is the derivative of the bound,
    ``g · (1 − tanh²) · half / half_width``, from the saved tanh. Constants broadcast on the last dim.
    """

    @staticmethod
    def forward(ctx, z, shift, half, offset, half_width, grad_scale):
        t = torch.tanh(z + shift)
        rounded = (t * half).sub_(offset).round_()  # integers in [-(L//2), (L-1)//2]
        codes = rounded / half_width
        ctx.save_for_backward(t, grad_scale)
        ctx.mark_non_differentiable(rounded)
        return codes, rounded

    @staticmethod
    def backward(ctx, grad_codes, grad_rounded):
        t, grad_scale = ctx.saved_tensors
        grad_z = torch.ops.aten.tanh_backward(grad_codes * grad_scale, t)  # g · scale · (1 − t²)
        return grad_z, None, None, None, None, None


class _Constants(NamedTuple):
    """The FSQ module's derived constants on one device and dtype. Per channel (d,) and tiled
    (TILE*d,) for the (n/TILE, TILE*d) view: shift, half, offset, half_width, grad_scale."""

    plain: tuple[torch.Tensor, ...]
    tiled: tuple[torch.Tensor, ...]
    basis_f: torch.Tensor  # (d,) float place values
    index_matrix: torch.Tensor  # (TILE*d, TILE) block-diagonal basis
    index_bias: torch.Tensor  # (TILE,) sum_i (L_i//2) * basis_i
    half_levels: torch.Tensor  # (d,) int64 L_i // 2
    basis: torch.Tensor  # (d,) int64 place values


def fsq_entropy_loss(
    z: torch.Tensor, levels: Sequence[int], temperature: float = 0.5, eps: float = FSQ_EPS
) -> torch.Tensor:
    """Per-channel entropy penalty ``mean_i [ E[H(p_i)] - H(E[p_i]) ]`` (MAGVIT-v2's entropy loss,
    Yu et al. 2023, "Language Model Beats Diffusion", applied to each FSQ channel separately).

    ``p_i`` is a soft assignment of the bounded value ``b(z)_i`` to channel i's L_i integer levels,
    ``softmax(-(b - level)² / temperature)``. Minimizing the penalty keeps each assignment confident
    (low per-vector entropy) while spreading the batch over all levels (high marginal entropy), which
    raises codebook usage. Each channel's entropies are divided by log(L_i) so channels weigh alike.
    z: (..., d) → scalar.
    """
    bounded = fsq_bound(z.float(), levels, eps).reshape(-1, len(levels))  # (n, d)
    total = bounded.new_zeros(())
    for i, level in enumerate(levels):
        grid = torch.arange(level, device=z.device, dtype=bounded.dtype) - level // 2  # (L,) integer levels
        logits = -(bounded[:, i : i + 1] - grid).pow(2) / temperature  # (n, L)
        p = logits.softmax(-1)
        per_vector = -(p * logits.log_softmax(-1)).sum(-1).mean()
        marginal = p.mean(0)
        batch = -(marginal * marginal.clamp_min(1e-12).log()).sum()
        total = total + (per_vector - batch) / math.log(level)
    return total / len(levels)


def _outer_rows(probs: list[torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    """Row-wise outer product of per-channel distributions ``(n, L_i)`` → ``(n, Π L_i)``; ``(n, 1)``
    for none."""
    out = like.new_ones(n, 1)  # (n, 1), grows to (n, prod of the L_i so far)
    for p in probs:
        out = (p[:, :, None] * out[:, None, :]).reshape(n, -1)  # (n, L, K) -> (n, L*K)
    return out


def fsq_joint_entropy_loss(
    z: torch.Tensor, levels: Sequence[int], temperature: float = 0.5, eps: float = FSQ_EPS
) -> torch.Tensor:
    """Codebook-level entropy penalty ``E[H(q)] - H(E[q])`` over all ``prod(levels)`` codes, where
    ``q`` is a vector's soft assignment to whole codes (MAGVIT-v2's entropy loss, Yu et al. 2023,
    over the implicit FSQ codebook instead of per channel).

    With per-channel soft assignments ``p_i`` (as :func:`fsq_entropy_loss`), ``q`` is their outer
    product, so ``H(q) = Σ_i H(p_i)``; the batch term needs the batch-mean joint distribution
    ``E[q]``, a ``(prod(levels),)`` vector. Unlike the per-channel penalty, it rewards using every
    *combination* of levels, which is what codebook usage counts. Divided by log(codebook size).

    ``E[q]`` is computed without the ``(n, prod(levels))`` matrix of every vector's ``q``: with ``a``
    the outer product of the first half of the channels' ``p_i`` ``(n, K_a)`` and ``b`` that of the
    second half ``(n, K_b)``, ``E[q]`` is ``aᵀb / n`` ``(K_a, K_b)``, one matmul (its entries in another
    order than code indices, which the entropy does not see). For [8, 5, 5, 5] and n = 4,096 that is
    two ``(n, 40)``/``(n, 25)`` matrices instead of an ``(n, 1000)`` one and its three products.
    z: (..., d) → scalar.
    """
    bounded = fsq_bound(z.float(), levels, eps).reshape(-1, len(levels))  # (n, d)
    n = bounded.shape[0]
    per_vector = bounded.new_zeros(())
    probs = []
    for i, level in enumerate(levels):
        grid = torch.arange(level, device=z.device, dtype=bounded.dtype) - level // 2  # (L,) integer levels
        logits = -(bounded[:, i : i + 1] - grid).pow(2) / temperature  # (n, L)
        p = logits.softmax(-1)
        per_vector = per_vector - (p * logits.log_softmax(-1)).sum(-1).mean()
        probs.append(p)
    half = (len(probs) + 1) // 2
    a = _outer_rows(probs[:half], n, bounded)  # (n, K_a)
    b = _outer_rows(probs[half:], n, bounded)  # (n, K_b)
    marginal = (a.t() @ b / n).reshape(-1)  # (K_a, K_b) -> (K,), the batch mean of q
    batch = -(marginal * marginal.clamp_min(1e-12).log()).sum()
    return (per_vector - batch) / math.log(math.prod(levels))


ENTROPY_MODES = {"channel": fsq_entropy_loss, "joint": fsq_joint_entropy_loss}


class FSQ(nn.Module):
    """FSQ bottleneck over channel-last input (..., d), d = len(levels). No parameters; no loss
    unless the optional entropy regularizer is on (``entropy_weight > 0``, training only).

    Quantization runs in float32 (float64 input stays float64) even under autocast; the
    quantized output is cast back to the input dtype.

    The derived constants are not buffers: transformers >= 5 builds models on the meta device and
    refills non-persistent buffers with uninitialized memory, and ``model.to(torch.bfloat16)`` would
    round float buffers (moving code boundaries). They are rebuilt from ``levels`` (always in
    float32, as the reference does) on first use per (device, dtype) and cached.
    """

    def __init__(
        self,
        levels: Sequence[int] = (8, 5, 5, 5),
        eps: float = FSQ_EPS,
        compute_metrics: bool = True,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.5,
        entropy_mode: str = "channel",
    ):
        super().__init__()
        if entropy_weight < 0 or entropy_temperature <= 0:
            raise ValueError("entropy_weight must be >= 0 and entropy_temperature > 0")
        # Optional usage regularizer (fsq_entropy_loss), applied in training only; 0 = plain FSQ.
        if entropy_mode not in ENTROPY_MODES:
            raise ValueError(f"entropy_mode must be one of {list(ENTROPY_MODES)}, got {entropy_mode!r}")
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.entropy_mode = entropy_mode
        self.levels: list[int] = [int(level) for level in levels]
        if not self.levels or any(level < 2 for level in self.levels):
            raise ValueError(f"FSQ levels must be a non-empty list of ints >= 2, got {list(levels)!r}")
        self.dim = len(self.levels)
        self.codebook_size = math.prod(self.levels)
        self.eps = eps
        self.compute_metrics = compute_metrics  # batch usage / perplexity in the output metrics
        basis = [math.prod(self.levels[:i]) for i in range(self.dim)]
        # index = sum_i (round(b_i) + L_i//2) * basis_i = round(b) . basis + sum_i (L_i//2) * basis_i
        self._index_offset = sum(level // 2 * b for level, b in zip(self.levels, basis))
        self._cache: dict[tuple[torch.device, torch.dtype], _Constants] = {}

    def _constants(self, device: torch.device, dtype: torch.dtype) -> _Constants:
        key = (device, dtype)
        if key not in self._cache:
            lv = _levels_tensor(self.levels, torch.device("cpu"))
            half, offset, shift = _bound_constants(lv, self.eps)  # float32 on the CPU, like the reference
            half_width = (lv // 2).float()
            plain = (shift, half, offset, half_width, half / half_width)  # last: d code / d tanh(z + shift)
            basis = _basis(lv)  # (d,) int64
            index_matrix = torch.block_diag(*[basis.double().unsqueeze(1)] * TILE)  # (TILE*d, TILE)
            self._cache[key] = _Constants(
                plain=tuple(c.to(device, dtype) for c in plain),
                tiled=tuple(c.repeat(TILE).to(device, dtype) for c in plain),
                basis_f=basis.to(device, dtype),
                index_matrix=index_matrix.to(device, dtype),
                index_bias=torch.full((TILE,), float(self._index_offset), dtype=dtype, device=device),
                half_levels=(lv // 2).long().to(device),
                basis=basis.to(device),
            )
        return self._cache[key]

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}"

    def _check_dim(self, z: torch.Tensor) -> None:
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"FSQ(levels={self.levels}) expects channel-last input (..., {self.dim}), got shape "
                f"{tuple(z.shape)}; project the encoder output to {self.dim} channels first"
            )

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (..., d), indices (...)) from float32/float64 input: ``fsq_quantize`` plus the index."""
        dtype, shape, d = z.dtype, z.shape, self.dim
        c = self._constants(z.device, dtype)
        tiled = z.is_contiguous() and z.numel() > 0 and z.numel() % (TILE * d) == 0
        zv = z.view(-1, TILE * d) if tiled else z  # (..., d) -> (n/TILE, TILE*d)
        codes, rounded = _FusedFSQ.apply(zv, *(c.tiled if tiled else c.plain))
        # The index is an integer-valued dot product: exact in float32 below 2**24 (float64: 2**53)
        # when the matmul really is IEEE; otherwise exact int64 arithmetic.
        limit = 2**53 if dtype == torch.float64 else (2**24 if _exact_float32_matmul(z.device) else 0)
        if self.codebook_size <= limit and tiled:
            indices = torch.addmm(c.index_bias, rounded, c.index_matrix).long()  # (n/TILE, TILE)
        elif self.codebook_size <= limit:
            indices = torch.mv(rounded.reshape(-1, d), c.basis_f).long() + self._index_offset  # (n,)
        else:
            digits = rounded.reshape(-1, d).long() + c.half_levels  # (n, d)
            indices = (digits * c.basis).sum(dim=-1)  # (n,)
        return codes.view(shape), indices.reshape(shape[:-1])  # back to (..., d) and (...)

    def forward(self, z: torch.Tensor) -> BottleneckOutput:
        """z: (..., d) -> quantized (..., d) in z's dtype, indices (...) int64, loss 0."""
        self._check_dim(z)
        orig_dtype = z.dtype
        zf = z if orig_dtype in (torch.float32, torch.float64) else z.float()
        if torch.is_autocast_enabled(z.device.type):
            with torch.autocast(device_type=z.device.type, enabled=False):
                codes, indices = self._quantize(zf)
        else:
            codes, indices = self._quantize(zf)
        metrics = code_usage_metrics(indices, self.codebook_size) if self.compute_metrics else {}
        loss = torch.zeros((), device=z.device, dtype=orig_dtype)
        if self.entropy_weight > 0 and self.training and z.requires_grad:
            penalty = ENTROPY_MODES[self.entropy_mode]
            loss = self.entropy_weight * penalty(z, self.levels, self.entropy_temperature, self.eps)
        return BottleneckOutput(quantized=codes.to(orig_dtype), indices=indices, loss=loss, metrics=metrics)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (..., d) in [-1, 1] -> int64 indices (...)."""
        self._check_dim(codes)
        return fsq_codes_to_indices(codes, self.levels)

    def indices_to_codes(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Indices (...) -> codes (..., d); what the decoder sees for those tokens."""
        if bool(((indices < 0) | (indices >= self.codebook_size)).any()):
            raise ValueError(f"FSQ indices must lie in [0, {self.codebook_size})")
        return fsq_indices_to_codes(indices, self.levels, dtype=dtype)
