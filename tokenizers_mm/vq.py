"""Vector quantization with a learned codebook (van den Oord et al. 2017, "Neural Discrete
Representation Learning"), EMA codebook updates (Razavi et al. 2019, VQ-VAE-2, App. A / van den
Oord 2017 App. A.1), k-means init, dead-code restart, and straight-through or rotation-trick
gradients (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick").

The maths is in pure functions (``nearest_code``, ``ste``, ``rotation_trick``, ``kmeans``,
``ema_codebook``); ``VectorQuantizer`` holds the codebook state and applies the training-only
updates when asked (``update_codebook``, default ``self.training``). In distributed training the
update statistics are all-reduced and random choices broadcast from rank 0, so every rank keeps
the same codebook.

Shape legend: ``...`` leading dims (batch, height, width), ``n`` flattened vectors, ``d`` code
dim, ``k`` codebook size.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenizers_mm.bottleneck_output import BottleneckOutput
from tokenizers_mm.fsq import usage_from_counts

GRADIENTS = ("ste", "rotation")
DISTANCES = ("l2", "cosine")
# Distance matrices are computed in row chunks of at most this many (n x k) elements (64 MiB fp32).
_CHUNK_ELEMENTS = 2**24


# ----------------------------------------------------------------------------- distributed helpers
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op when not distributed)."""
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Replace ``t`` in place by rank 0's copy (no-op when not distributed)."""
    if _distributed():
        dist.broadcast(t, src=0)
    return t


# ----------------------------------------------------------------------------- pure functions
def nearest_code(z: torch.Tensor, codebook: torch.Tensor, distance: str = "l2") -> torch.Tensor:
    """Index of the nearest code for each row of z (n, d) among codebook (k, d) -> (n,) int64.

    "l2": argmin ||z - e||² = argmin (||e||² - 2 z·e) (||z||² is the same for every code), one
    fused addmm per chunk of rows; never an (n, k, d) tensor. "cosine": argmax z·e, so pass unit
    vectors. Computed in float32 (float64 stays float64), autocast off.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    z, codebook = z.to(dtype), codebook.to(dtype)
    k = codebook.shape[0]
    rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
    codebook_t = codebook.t()  # (d, k)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    ctx = (
        torch.autocast(device_type=z.device.type, enabled=False)
        if torch.is_autocast_enabled(z.device.type)
        else contextlib.nullcontext()
    )
    with ctx:
        if distance == "l2":
            sq = codebook.square().sum(dim=1)  # (k,)
            for s in range(0, z.shape[0], rows):
                scores = torch.addmm(sq, z[s : s + rows], codebook_t, alpha=-2.0)  # (rows, k)
                out[s : s + rows] = scores.min(dim=1).indices  # 3x faster than argmin on CPU
        else:
            for s in range(0, z.shape[0], rows):
                scores = z[s : s + rows] @ codebook_t  # (rows, k)
                out[s : s + rows] = scores.max(dim=1).indices
    return out


def ste(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator (van den Oord et al. 2017): value q, gradient to z unchanged."""
    return z + (q - z).detach()


def rotation_trick(z: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotation trick (Fifty et al. 2024, eq. 4): value q, gradient rotated from q onto z.

    ``zq = sg(‖q‖/‖z‖) · (z − 2 (z·sg(r)) sg(r) + 2 (z·sg(ẑ)) sg(q̂))`` with ``ẑ = z/‖z‖``,
    ``q̂ = q/‖q‖``, ``r = (ẑ + q̂)/‖ẑ + q̂‖``: the rotation taking ẑ to q̂ (a Householder reflection
    through r then through q̂), applied to z and rescaled. Treated as a fixed linear map of z, the
    gradient for upstream g is ``sg(‖q‖/‖z‖)·(g − 2 (g·r) r + 2 (g·q̂) ẑ)``. z, q: (..., d).

    Norms are clamped at ``eps``. The value equals q up to rounding, except where z and q are
    (nearly) antiparallel: there r is ill-conditioned (ẑ + q̂ ≈ 0) and the float value can miss q by
    O(‖q‖). A detached correction ``+ sg(q − value)`` makes the value q everywhere without touching
    the gradient (at most a few float32 ulps elsewhere).
    """
    with torch.no_grad():
        z_norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(eps)  # (..., 1)
        q_norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(eps)  # (..., 1)
        z_hat = z / z_norm  # (..., d)
        q_hat = q / q_norm  # (..., d)
        r = z_hat + q_hat
        r = r / torch.linalg.vector_norm(r, dim=-1, keepdim=True).clamp_min(eps)  # (..., d)
        scale = q_norm / z_norm  # (..., 1)
    z_dot_r = (z * r).sum(dim=-1, keepdim=True)  # (..., 1)
    z_dot_zhat = (z * z_hat).sum(dim=-1, keepdim=True)  # (..., 1)
    rotated = scale * (z - 2 * z_dot_r * r + 2 * z_dot_zhat * q_hat)
    return rotated + (q - rotated).detach()


def _sample_rows(x: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` random rows of x (n, d): without replacement when n >= count, else with it."""
    n = x.shape[0]
    if n >= count:
        idx = torch.randperm(n, generator=generator, device=x.device)[:count]
    else:
        idx = torch.randint(0, n, (count,), generator=generator, device=x.device)
    return x[idx]  # (count, d)


def _cluster_stats(x: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts (k,) and vector sums (k, d) of rows x (n, d) assigned to idx (n,)."""
    counts = torch.bincount(idx, minlength=k).to(x.dtype)  # (k,)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, idx, x)  # (k, d)
    return counts, sums


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 10,
    distance: str = "l2",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on rows of x (n, d) from k random rows -> (centroids (k, d), counts (k,)).

    Empty clusters keep their previous centroid. "cosine" runs spherical k-means (unit centroids;
    pass unit x). When torch.distributed is initialized, the initial rows come from rank 0 and the
    per-iteration statistics are summed over ranks, so all ranks get the same centroids.
    """
    centroids = _broadcast_from_rank0(_sample_rows(x, k, generator).contiguous())  # (k, d)
    counts = torch.zeros(k, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        idx = nearest_code(x, centroids, distance)  # (n,)
        counts, sums = _cluster_stats(x, idx, k)
        _all_reduce_sum(counts)
        _all_reduce_sum(sums)
        new = sums / counts.clamp_min(1.0).unsqueeze(1)  # (k, d)
        if distance == "cosine":
            new = F.normalize(new, dim=-1)
        centroids = torch.where(counts.unsqueeze(1) > 0, new, centroids)
    return centroids, counts


@torch.no_grad()
def ema_codebook(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float,
    eps: float,
) -> torch.Tensor:
    """EMA codebook update (van den Oord et al. 2017 App. A.1; Razavi et al. 2019), in place.

    ``N ← γN + (1−γ)n``, ``m ← γm + (1−γ)Σz``, then the codebook is ``m / Ñ`` with the
    Laplace-smoothed sizes ``Ñ_i = (N_i + ε) / (ΣN + kε) · ΣN`` (so no code divides by 0).
    cluster_size, counts: (k,); embed_sum, sums: (k, d). Returns the new codebook (k, d).
    """
    cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
    embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + cluster_size.numel() * eps) * total  # (k,)
    return embed_sum / smoothed.unsqueeze(1)  # (k, d)


# ----------------------------------------------------------------------------- module
class VectorQuantizer(nn.Module):
    """VQ bottleneck over channel-last input (..., dim); indices (...) in [0, codebook_size).

    Loss: commitment ``β‖z − sg(q)‖²`` always, plus the codebook loss ``‖sg(z) − q‖²`` when the
    codebook is learned by gradient (``ema=False``). With ``distance="cosine"`` z and the codes are
    unit vectors and ``quantized`` is the unit code.

    Training-only codebook updates (k-means init on the first batch, EMA, dead-code restart) run
    when ``forward(..., update_codebook=True)``; the default is ``self.training``. A code counts as
    used in an update step when at least ``dead_code_threshold`` vectors of the (global) batch pick
    it; a code unused for ``dead_code_steps`` consecutive update steps is moved onto a random
    current encoder output (plus ``restart_noise`` × the batch std) at the start of the next one.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        gradient: str = "ste",
        distance: str = "l2",
        ema: bool = True,
        decay: float = 0.99,
        beta: float = 0.25,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 1.0,
        dead_code_steps: int = 100,
        eps: float = 1e-5,
        restart_noise: float = 1e-3,
    ):
        super().__init__()
        if codebook_size < 1 or dim < 1:
            raise ValueError(f"codebook_size and dim must be >= 1, got {codebook_size}, {dim}")
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if beta < 0 or kmeans_iters < 0 or dead_code_steps < 0 or eps <= 0 or dead_code_threshold <= 0:
            raise ValueError("beta, kmeans_iters, dead_code_steps must be >= 0; eps, dead_code_threshold > 0")
        self.codebook_size = codebook_size
        self.dim = dim
        self.gradient = gradient
        self.distance = distance
        self.ema = ema
        self.decay = decay
        self.beta = beta
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        self.dead_code_steps = dead_code_steps  # 0 disables restarts
        self.eps = eps  # Laplace smoothing of the EMA cluster sizes
        self.restart_noise = restart_noise

        # Random normal init (unit-norm rows for cosine); replaced by k-means on the first update.
        init = torch.randn(codebook_size, dim)  # (k, d)
        if distance == "cosine":
            init = F.normalize(init, dim=-1)
        if ema:
            # EMA state: the codebook is embed_sum / cluster_size. Every code starts as if one
            # vector had been assigned to it, so unused codes keep their value as both decay.
            self.register_buffer("codebook", init)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))
        # Code counts accumulated by every forward since reset_usage(): per-process evaluation
        # bookkeeping, not model state, so it is not saved (ranks see different data and would
        # otherwise save different weights). int64 so dtype casts leave it intact. transformers >= 5
        # re-creates non-persistent buffers uninitialized on load; its _init_weights calls reset_usage().
        self.register_buffer("usage_counts", torch.zeros(codebook_size, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, dim={self.dim}, gradient={self.gradient!r}, "
            f"distance={self.distance!r}, ema={self.ema}, dead_code_steps={self.dead_code_steps}"
        )

    # -------------------------------------------------------------- lookups
    def _codes(self) -> torch.Tensor:
        """The codebook as used for lookup (k, d), float32 (float64 stays): unit rows for cosine."""
        cb = self.codebook.to(torch.promote_types(self.codebook.dtype, torch.float32))
        return F.normalize(cb, dim=-1) if self.distance == "cosine" and not self.ema else cb

    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Channel-last input (..., d) -> float32 rows (n, d) (float64 with a float64 codebook), unit-norm
        for cosine."""
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"VectorQuantizer(dim={self.dim}) expects channel-last input (..., {self.dim}), "
                f"got shape {tuple(z.shape)}"
            )
        dtype = torch.promote_types(self.codebook.dtype, torch.float32)
        flat = z.reshape(-1, self.dim).to(dtype)  # (..., d) -> (n, d)
        return F.normalize(flat, dim=-1) if self.distance == "cosine" else flat

    @torch.no_grad()
    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices (...) for vectors (..., d)."""
        flat = self._prepare(codes)  # (n, d)
        return nearest_code(flat, self._codes(), self.distance).reshape(codes.shape[:-1])  # (n,) -> (...)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (..., d) for indices (...)."""
        if bool(((indices < 0) | (indices >= self.codebook_size)).any()):
            raise ValueError(f"VQ indices must lie in [0, {self.codebook_size})")
        return F.embedding(indices.long(), self._codes())  # (...) -> (..., d)

    # -------------------------------------------------------------- usage bookkeeping
    def reset_usage(self) -> None:
        """Start a new usage-counting period (e.g. at the start of an evaluation)."""
        self.usage_counts.zero_()

    def usage_stats(self, all_ranks: bool = False) -> dict[str, float]:
        """``{"codebook_usage": fraction of codes used, "perplexity": exp(entropy)}`` since ``reset_usage``.

        all_ranks: sum the counts over ranks first (a collective: call it on every rank).
        """
        counts = self.usage_counts.clone()
        if all_ranks:
            _all_reduce_sum(counts)
        stats = usage_from_counts(counts)
        return {"codebook_usage": stats["usage"], "perplexity": stats["perplexity"]}

    # -------------------------------------------------------------- training-only updates
    @torch.no_grad()
    def _init_codebook(self, flat: torch.Tensor, generator: torch.Generator | None) -> None:
        """k-means on the first training batch (rows flat (n, d))."""
        centroids, counts = kmeans(flat, self.codebook_size, self.kmeans_iters, self.distance, generator)
        self.codebook.copy_(centroids)
        if self.ema:
            # Counts of the final assignment, at least 1 so that empty clusters keep their centroid.
            self.cluster_size.copy_(counts.clamp_min(1.0))
            self.embed_sum.copy_(centroids * self.cluster_size.unsqueeze(1))
        self.initialized.fill_(True)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, generator: torch.Generator | None) -> int:
        """Move codes unused for ``dead_code_steps`` update steps onto current encoder outputs."""
        if self.dead_code_steps == 0:
            return 0
        dead = (self.steps_unused >= self.dead_code_steps).nonzero().squeeze(1)  # (m,)
        m = dead.numel()  # the same on every rank: steps_unused comes from all-reduced counts
        if m == 0:
            return 0
        new = _sample_rows(flat, m, generator)  # (m, d)
        noise = torch.randn(new.shape, generator=generator, device=new.device, dtype=new.dtype)
        new = new + self.restart_noise * flat.std(dim=0, correction=0, keepdim=True) * noise
        if self.distance == "cosine":
            new = F.normalize(new, dim=-1)
        _broadcast_from_rank0(new.contiguous())
        self.codebook[dead] = new.to(self.codebook.dtype)
        if self.ema:
            self.cluster_size[dead] = self.dead_code_threshold
            self.embed_sum[dead] = new * self.dead_code_threshold
        self.steps_unused[dead] = 0
        return m

    @torch.no_grad()
    def _update_after_lookup(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA step and unused-step bookkeeping from this batch's assignments (global over ranks)."""
        counts = _all_reduce_sum(counts.clone())  # (k,)
        if self.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, flat)  # (k, d)
            _all_reduce_sum(sums)
            codebook = ema_codebook(self.cluster_size, self.embed_sum, counts, sums, self.decay, self.eps)
            self.codebook.copy_(F.normalize(codebook, dim=-1) if self.distance == "cosine" else codebook)
        used = counts >= self.dead_code_threshold
        self.steps_unused.add_(1).masked_fill_(used, 0)

    # -------------------------------------------------------------- forward
    def forward(
        self,
        z: torch.Tensor,
        update_codebook: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> BottleneckOutput:
        """z: (..., d) -> quantized (..., d) in z's dtype, indices (...) int64, loss scalar.

        update_codebook: apply k-means init / dead-code restart / EMA (default ``self.training``).
        generator: randomness of k-means init and restarts (on z's device).
        Metrics: batch ``usage`` and ``perplexity``, ``restarts`` this step.
        """
        update = self.training if update_codebook is None else update_codebook
        orig_dtype = z.dtype
        flat = self._prepare(z)  # (n, d) float32
        restarts = 0
        if update:
            if not bool(self.initialized):
                self._init_codebook(flat.detach(), generator)
            # Before the lookup, so that the codebook is never changed in place after autograd used it.
            restarts = self._restart_dead_codes(flat.detach(), generator)

        codes = self._codes()  # (k, d)
        idx = nearest_code(flat.detach(), codes.detach(), self.distance)  # (n,)
        q = F.embedding(idx, codes)  # (n, d); carries the codebook gradient when learned

        loss = self.beta * F.mse_loss(flat, q.detach())
        if not self.ema:
            loss = loss + F.mse_loss(q, flat.detach())
        out = ste(flat, q) if self.gradient == "ste" else rotation_trick(flat, q)

        with torch.no_grad():
            counts = torch.bincount(idx, minlength=self.codebook_size)  # (k,) local
            self.usage_counts.add_(counts)
            if update:
                self._update_after_lookup(flat.detach(), idx, counts.to(flat.dtype))
            metrics = usage_from_counts(counts.float())
        metrics["restarts"] = float(restarts)
        quantized = out.reshape(z.shape).to(orig_dtype)  # (n, d) -> (..., d)
        return BottleneckOutput(
            quantized=quantized, indices=idx.reshape(z.shape[:-1]), loss=loss.to(orig_dtype), metrics=metrics
        )
