"""Iterative unmasking (MAR-style) generation for bidirectional image attention.

Invariants on a random-headed model (cached == uncached, batched == one prompt at a time, seeded,
unguided at CFG 1), the reveal schedule, and a trained toy: a causal or bidirectional decoder that learned
caption → latents generates the latents its prompt names.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from ar_model.attention import doc_ids_from_seq_lens
from ar_model.config import MMDecoderConfig, vocab_layout
from ar_model.image_blocks import image_block_ids, sample_visible_latents
from ar_model.latent_generation import generate_image_latents
from ar_model.masked_generation import default_num_iter, reveal_counts
from ar_model.modeling import MMDecoderForCausalLM
from ar_model.packing import build_packed_batch, pack_documents
from ar_model.sequence import build_sequence, text_to_image_document
from ar_model.text_tokenizer import TextTokenizer

_spec = importlib.util.spec_from_file_location(
    "flow_decoder", Path(__file__).with_name("test_ar_flow_decoder.py")
)
fd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fd)


@pytest.fixture(scope="module")
def model(text_tokenizer: TextTokenizer) -> MMDecoderForCausalLM:
    return fd.continuous_model(text_tokenizer, image_attention="bidirectional")


def _prompts(tok: TextTokenizer, captions: list[str]) -> list[torch.Tensor]:
    return [torch.tensor([tok.bos_id, *tok.encode(c)]) for c in captions]


def _gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_reveal_counts_follow_the_cosine_schedule() -> None:
    counts = reveal_counts(256, 64)
    assert sum(counts) == 256 and min(counts) >= 1 and len(counts) == 64
    masked = [256 - sum(counts[: k + 1]) for k in range(64)]
    # after iteration k, floor(N cos(pi/2 (k+1)/K)) positions stay masked (MAR), but at least one
    # position is revealed per iteration and one is left for each later iteration
    expected, prev = [], 256
    for k in range(64):
        prev = max(64 - k - 1, min(math.floor(256 * math.cos(math.pi / 2 * (k + 1) / 64)), prev - 1))
        expected.append(prev)
    assert masked == expected and masked[31] == math.floor(256 * math.cos(math.pi / 4))  # 181
    assert masked[-1] == 0
    assert reveal_counts(4, 4) == [1, 1, 1, 1] and reveal_counts(5, 1) == [5]
    assert default_num_iter(64) == 16 and default_num_iter(2) == 1
    for bad in (0, 5):
        with pytest.raises(ValueError, match="num_iter"):
            reveal_counts(4, bad)


def test_cached_equals_uncached_with_guidance_and_padding(model, text_tokenizer) -> None:
    prompts = _prompts(text_tokenizer, ["a red circle", "two blue squares left of a green star"])
    kw = dict(num_iter=3, num_inference_steps=2, guidance_scale=2.5, cfg_schedule="linear")
    cached = generate_image_latents(model, prompts, 2, 3, generator=_gens([0, 1]), **kw)
    uncached = generate_image_latents(model, prompts, 2, 3, generator=_gens([0, 1]), use_cache=False, **kw)
    assert cached.shape == (2, 2, 3, fd.LATENT_DIM) and torch.isfinite(cached).all()
    torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-5)


def test_batched_equals_one_prompt_at_a_time_and_seeds_repeat(model, text_tokenizer) -> None:
    captions = ["a red circle", "two blue squares left of a green star", ""]
    prompts = _prompts(text_tokenizer, captions)
    kw = dict(num_iter=4, num_inference_steps=2, guidance_scale=2.0)
    batched = generate_image_latents(model, prompts, 3, 3, generator=_gens([5, 6, 7]), **kw)
    alone = torch.cat(
        [
            generate_image_latents(model, [p], 3, 3, generator=_gens([s]), **kw)
            for p, s in zip(prompts, (5, 6, 7))
        ]
    )
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)  # left padding: rounding only
    again = generate_image_latents(model, prompts, 3, 3, generator=_gens([5, 6, 7]), **kw)
    assert torch.equal(batched, again)
    other = generate_image_latents(model, prompts, 3, 3, generator=_gens([8, 6, 7]), **kw)
    assert not torch.equal(other[0], batched[0]) and torch.equal(other[1:], batched[1:])


def test_iterations_and_guidance_matter_and_scale_one_is_unguided(model, text_tokenizer) -> None:
    prompts = _prompts(text_tokenizer, ["a red circle"])
    base = generate_image_latents(model, prompts, 2, 2, num_iter=2, generator=_gens([0]))
    assert not torch.equal(
        base, generate_image_latents(model, prompts, 2, 2, num_iter=4, generator=_gens([0]))
    )
    guided = generate_image_latents(
        model, prompts, 2, 2, num_iter=2, guidance_scale=3.0, generator=_gens([0])
    )
    assert not torch.equal(base, guided)
    linear = generate_image_latents(
        model, prompts, 2, 2, num_iter=2, guidance_scale=1.0, cfg_schedule="linear", generator=_gens([0])
    )
    assert torch.equal(base, linear)  # scale 1: no uncond rows at all


def test_num_iter_is_checked(model, text_tokenizer) -> None:
    prompts = _prompts(text_tokenizer, ["a red circle"])
    with pytest.raises(ValueError, match="num_iter"):
        generate_image_latents(model, prompts, 2, 2, num_iter=5)
    causal = fd.continuous_model(text_tokenizer)
    with pytest.raises(ValueError, match="bidirectional"):
        generate_image_latents(causal, prompts, 2, 2, num_iter=2)


# ----------------------------------------------------------------------------- a trained toy
COLORS = ("red", "green", "blue", "yellow")
SHAPES = {"circle": (0, 1, 1, 0), "square": (1, 1, 1, 1), "triangle": (0, 0, 1, 1)}  # 2x2 raster masks


@pytest.mark.slow  # ~40 s of training on one CPU thread
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_a_trained_model_generates_what_its_prompt_names(text_tokenizer, attention: str) -> None:
    """Toy data: 2x2 latents whose colour vector comes from the caption's colour and whose pattern from
    its shape (background vector elsewhere). After training (bidirectional: MAR-style random masking per
    image), the generated latents must name the prompt's colour and shape: token by token in raster
    order (causal), or in every unmasking mode (bidirectional). This is the end-to-end check that the
    caption reaches the diffusion head through the trunk."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(len(COLORS) + 1, fd.LATENT_DIM, generator=g)  # colours, then background
    cfg = MMDecoderConfig(
        **vocab_layout(text_tokenizer, 1), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
        latent_dim=fd.LATENT_DIM, diffusion_head={"width": 64, "depth": 2}, image_attention=attention,
    )  # fmt: skip
    model = MMDecoderForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def image(color: int, shape: str) -> torch.Tensor:
        rows = [protos[color] if on else protos[-1] for on in SHAPES[shape]]
        return torch.stack(rows).view(2, 2, fd.LATENT_DIM)  # (4, D) -> (2, 2, D)

    rng = torch.Generator().manual_seed(2)
    for _ in range(300):
        docs = []
        for _ in range(64):
            c = int(torch.randint(len(COLORS), (), generator=rng))
            s = list(SHAPES)[int(torch.randint(len(SHAPES), (), generator=rng))]
            lat = image(c, s) + 0.05 * torch.randn(2, 2, fd.LATENT_DIM, generator=rng)
            doc = text_to_image_document(f"a {COLORS[c]} {s}", lat)
            docs.append(build_sequence(doc, text_tokenizer, image_token_id=cfg.latent_token_id).as_document())
        batch = build_packed_batch(docs, pack_documents([len(d["input_ids"]) for d in docs], 512), pad_id=0)
        ids = batch["input_ids"]
        segments = doc_ids_from_seq_lens(batch.seq_lens, ids.shape[1], ids.device)  # (b, n)
        visible = sample_visible_latents(image_block_ids(ids, cfg.latent_token_id, segments), rng)
        if attention == "causal":
            visible = torch.ones_like(visible)  # every latent is an input; the next one is the target
        out = model(
            ids, positions=batch["positions"], seq_lens=batch.seq_lens, labels=batch["labels"],
            latents=batch["latents"], latent_mask=batch["latent_mask"] & visible,
        )  # fmt: skip
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    captions = [(c, s) for c in range(len(COLORS)) for s in SHAPES]
    prompts = _prompts(text_tokenizer, [f"a {COLORS[c]} {s}" for c, s in captions])
    # bidirectional: all at once (Transfusion-like), MAR's schedule, one token per iteration
    for num_iter in (1, 2, 4) if attention == "bidirectional" else (None,):
        lat = generate_image_latents(
            model, prompts, 2, 2, num_iter=num_iter, num_inference_steps=4, generator=_gens(range(12))
        )  # (12, 2, 2, D)
        nearest = torch.cdist(lat.view(12, 4, -1), protos).argmin(-1)  # (12, 4): prototype per token
        want = torch.stack([torch.cdist(image(c, s).view(4, -1), protos).argmin(-1) for c, s in captions])
        exact = (nearest == want).all(-1).float().mean().item()
        assert exact >= 0.75, (num_iter, exact)  # chance: 1 in 12 (measured here: 11 of 12 in each mode)
