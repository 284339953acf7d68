"""Muon + AdamW (ar_model.optim) against torch's reference optimizers, and the trainer's parameter split."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_DECODER

from ar_model.modeling import MMDecoderForCausalLM
from ar_model.optim import MuonAdamW, build_optimizer, is_hidden_matrix, newton_schulz_orthogonalize
from ar_model.presets import preset_config


def _twin_params(*shapes: tuple[int, ...], seed: int = 0) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    return a, [torch.nn.Parameter(p.detach().clone()) for p in a]


def _step_both(opt_a, opt_b, params_a, params_b, steps: int = 4, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for pa, pb in zip(params_a, params_b):
            g = torch.randn(pa.shape, generator=gen)
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()


@pytest.mark.parametrize("shape", [(48, 48), (96, 32), (32, 96)])
def test_newton_schulz_approximates_the_polar_factor(shape):
    m = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = newton_schulz_orthogonalize(m)
    assert x.shape == m.shape and x.dtype == m.dtype
    # the quintic's fixed band: singular values land near 1, not at 1 (Jordan et al.)
    s = torch.linalg.svdvals(x)
    assert s.min() > 0.6 and s.max() < 1.25, s
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    polar = u @ vh
    cos = (x * polar).sum() / (x.norm() * polar.norm())
    assert cos > 0.95, cos
    with pytest.raises(ValueError, match="2-D"):
        newton_schulz_orthogonalize(torch.randn(2, 3, 4))


def test_muon_groups_match_torch_muon_in_bf16():
    # torch.optim.Muon runs its iteration in bf16; with the same dtype the updates are identical
    shapes = [(64, 32), (32, 64), (40, 40)]
    ref_params, params = _twin_params(*shapes)
    ref = torch.optim.Muon(ref_params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    groups = [{"params": params, "use_muon": True}]
    ours = MuonAdamW(groups, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    _step_both(ref, ours, ref_params, params)
    for a, b in zip(ref_params, params):
        assert torch.equal(a, b)


def test_muon_in_fp32_stays_close_to_the_bf16_reference():
    ref_params, params = _twin_params((64, 32))
    ref = torch.optim.Muon(ref_params, lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    ours = MuonAdamW([{"params": params, "use_muon": True}], lr=0.02)
    start = params[0].detach().clone()
    _step_both(ref, ours, ref_params, params, steps=1)
    moved_ref, moved = (ref_params[0] - start).detach(), (params[0] - start).detach()
    assert moved.abs().max() > 1e-3  # it moved
    # bf16 keeps ~3 significant digits through 5 iterations; the fp32 update is the same up to that
    rel = float((moved - moved_ref).norm() / moved_ref.norm())
    assert rel < 0.03, rel


def test_adamw_groups_match_torch_adamw():
    shapes = [(8, 6), (6,), (3, 4, 5)]
    ref_params, params = _twin_params(*shapes)
    ref = torch.optim.AdamW(ref_params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    ours = MuonAdamW([{"params": params, "use_muon": False}], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    _step_both(ref, ours, ref_params, params, steps=5)
    for a, b in zip(ref_params, params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_muon_refuses_non_matrices_and_unflagged_groups():
    with pytest.raises(ValueError, match="2-D weights only"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.ones(4))], "use_muon": True}], lr=1e-3)
    with pytest.raises(ValueError, match="use_muon"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.ones(4, 4))]}], lr=1e-3)


def test_build_optimizer_puts_exactly_the_layers_matrices_on_muon():
    model = MMDecoderForCausalLM(preset_config("tiny", vocab_size=1600, **TINY_DECODER))
    named = dict(model.named_parameters())
    opt = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.05)
    muon = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    expected = {id(p) for n, p in named.items() if ".layers." in n and p.ndim == 2}
    assert muon == expected and len(expected) == 7 * TINY_DECODER["num_layers"]
    assert id(named["model.embed_tokens.weight"]) not in muon
    # every parameter in exactly one group; decay on matrices only
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in named.values())
    for g in opt.param_groups:
        assert g["weight_decay"] == (0.05 if all(p.ndim == 2 for p in g["params"]) else 0.0)
    assert not is_hidden_matrix("model.layers.0.input_layernorm.weight", named["model.norm.weight"])
    adamw = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer(model, "sgd", lr=1e-3, weight_decay=0.0)


def test_muon_lowers_a_real_decoder_loss():
    torch.manual_seed(0)
    model = MMDecoderForCausalLM(preset_config("tiny", vocab_size=1600, **TINY_DECODER))
    ids = torch.randint(0, 1600, (4, 32), generator=torch.Generator().manual_seed(0))
    opt = build_optimizer(model, "muon", lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
