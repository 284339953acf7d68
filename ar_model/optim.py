"""Muon for the Transformer's hidden matrices, AdamW for everything else, in one optimizer.

Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks",
kellerjordan.github.io/posts/muon) replaces each 2-D weight's momentum update by its nearest
semi-orthogonal matrix, computed with a quintic Newton–Schulz iteration

    X ← a·X + (b·A + c·A²)·X,   A = X·Xᵀ,   (a, b, c) = (3.4445, −4.7750, 2.0315),  X₀ = M / ‖M‖_F

for 5 steps (M = the Nesterov momentum of the gradient). The update is then scaled to the RMS of a
typical AdamW update, 0.2·√max(fan_out, fan_in) (Liu et al., 2025, "Muon is Scalable for LLM
Training", §2.2), so that Muon and AdamW parameters share one learning rate, one weight decay and one
schedule. Embeddings, the LM head, norms and every non-hidden parameter stay on AdamW (Jordan et al.).

``torch.optim.Muon`` exists but always runs the iteration in bf16, which on CPUs without native bf16
matmuls costs more than the whole training step (3.7 s vs ~1.6 s at the shipped CPU dims); here the
iteration runs in fp32 on CPU and in bf16 on accelerators (``ns_dtype`` overrides).

One optimizer (param groups flagged ``use_muon``) keeps the trainer's plumbing unchanged: accelerate
prepares, clips, checkpoints and schedules it like any AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
OPTIMIZERS = ("adamw", "muon")


def newton_schulz_orthogonalize(m: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """About U·Vᵀ of ``m``'s SVD U·S·Vᵀ (singular values land in about [0.7, 1.2]); ``m``'s dtype."""
    if m.ndim != 2:
        raise ValueError(f"Newton–Schulz needs a 2-D matrix, got shape {tuple(m.shape)}")
    a, b, c = NS_COEFFICIENTS
    tall = m.size(0) > m.size(1)
    x = m.T if tall else m  # (rows ≤ cols): A = X·Xᵀ is the smaller Gram matrix
    x = x / x.norm().clamp(min=eps)  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon on groups with ``use_muon=True`` (2-D weights only), AdamW on the rest.

    Group keys: ``lr``, ``weight_decay`` (decoupled, both kinds), ``use_muon``; Muon groups also take
    ``momentum`` (0.95, Nesterov), AdamW groups ``betas`` and ``eps``.
    """

    def __init__(
        self,
        param_groups: list[dict],
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        momentum: float = 0.95,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = None,
    ):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        for group in param_groups:
            if "use_muon" not in group:
                raise ValueError("every MuonAdamW param group needs a use_muon flag")
            if group["use_muon"]:
                shapes = {tuple(p.shape) for p in group["params"] if p.ndim != 2}
                if shapes:
                    raise ValueError(f"Muon groups take 2-D weights only, got shapes {sorted(shapes)}")
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, momentum=momentum)
        super().__init__(param_groups, defaults)
        self.ns_steps, self.ns_dtype = ns_steps, ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            nesterov = p.grad.lerp(buf, mu)
            dtype = self.ns_dtype or (torch.float32 if p.device.type == "cpu" else torch.bfloat16)
            update = newton_schulz_orthogonalize(nesterov.to(dtype), self.ns_steps).to(p.dtype)
            scale = 0.2 * max(p.shape) ** 0.5  # RMS of an AdamW update (Liu et al., 2025)
            p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr * scale)

    def _adamw(self, group: dict) -> None:
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = float(state["step"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """A 2-D weight inside a decoder layer (attention and MLP projections): Muon's domain."""
    return param.ndim == 2 and ".layers." in f".{name}"


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    betas: Iterable[float] = (0.9, 0.95),
) -> torch.optim.Optimizer:
    """The trainer's optimizer: ``adamw`` (decay on matrices, not norms) or ``muon`` (:class:`MuonAdamW`).

    Weight decay applies to every matrix (embeddings and heads included) and never to vectors (norms,
    biases), for both optimizers.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    betas = tuple(betas)
    if name == "adamw":
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
            betas=betas,
        )
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    if not hidden:
        raise ValueError("optimizer muon found no hidden 2-D weights under a `layers` module")
    rest_decay = [p for n, p in named if not is_hidden_matrix(n, p) and p.ndim >= 2]
    rest_no_decay = [p for _, p in named if p.ndim < 2]
    groups = [
        {"params": hidden, "use_muon": True, "weight_decay": weight_decay},
        {"params": rest_decay, "use_muon": False, "weight_decay": weight_decay},
        {"params": rest_no_decay, "use_muon": False, "weight_decay": 0.0},
    ]
    return MuonAdamW([g for g in groups if g["params"]], lr=lr, betas=betas)
