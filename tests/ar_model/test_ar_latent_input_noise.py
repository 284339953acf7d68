"""``flow_loss.input_noise``: the decoder reads noisy latents, the diffusion head's targets stay clean.

Training and validation add ``σ·ε`` (ε from ``flow_generator``) to the teacher-forced latents; generation
adds it to each sampled latent before feeding it back (from the prompt's own generator, so batching
still does not change results); ``σ = 0`` leaves everything exactly as before.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ar_model.flow_matching import FlowLossConfig, flow_matching_loss
from ar_model.latent_generation import generate_image_latents
from ar_model.text_tokenizer import TextTokenizer

_spec = importlib.util.spec_from_file_location(
    "flow_decoder", Path(__file__).with_name("test_ar_flow_decoder.py")
)
fd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fd)

SIGMA = 0.5


def _model(tok: TextTokenizer, sigma: float, **overrides):
    return fd.continuous_model(tok, flow_loss={"weight": 0.5, "input_noise": sigma}, **overrides)


def test_training_reads_noisy_latents_and_regresses_clean_ones(text_tokenizer: TextTokenizer) -> None:
    noisy, clean = _model(text_tokenizer, SIGMA), _model(text_tokenizer, 0.0)
    seq = fd._sequences(text_tokenizer, noisy)[0]  # caption → 3×4 latents
    doc = seq.as_document()
    ids, pos = seq.input_ids[None], seq.positions[None]
    lat, mask, labels = doc["latents"][None], doc["latent_mask"][None], doc["labels"][None]
    with torch.no_grad():
        out = noisy(
            ids, positions=pos, labels=labels, latents=lat, latent_mask=mask,
            flow_generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        # The reference: ε is the generator's first draw; the flow loss continues from the same generator.
        g = torch.Generator().manual_seed(0)
        read = lat + SIGMA * torch.randn(lat.shape, generator=g)
        hidden = clean.model(ids, positions=pos, latents=read, latent_mask=mask).last_hidden_state
        cond, target = clean.flow_pairs(hidden, lat, mask)
        assert torch.equal(target, lat[mask])  # every latent of the image, clean
        ref = flow_matching_loss(clean.diffusion_head, cond, target, noisy.config.flow_loss_config, g)
        torch.testing.assert_close(out.flow_loss, ref.loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.last_hidden_state, hidden, atol=1e-6, rtol=1e-6)
        # The text tokens before the image read no latent: their states equal the clean model's.
        plain = clean(
            ids, positions=pos, labels=labels, latents=lat, latent_mask=mask,
            flow_generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        start = seq.image_spans[0][0]
        torch.testing.assert_close(out.last_hidden_state[:, :start], plain.last_hidden_state[:, :start])
        assert not torch.allclose(
            out.last_hidden_state[:, start + 1 :], plain.last_hidden_state[:, start + 1 :]
        )
        # Without labels (captioning, probes) the latents are read as given.
        again = noisy(ids, positions=pos, latents=lat, latent_mask=mask)
        torch.testing.assert_close(again.last_hidden_state, plain.last_hidden_state)


@pytest.mark.parametrize("image_attention", ["causal", "bidirectional"])
def test_generation_feeds_noisy_samples_and_stays_batch_invariant(
    text_tokenizer: TextTokenizer, image_attention: str
) -> None:
    noisy = _model(text_tokenizer, SIGMA, image_attention=image_attention)
    clean = _model(text_tokenizer, 0.0, image_attention=image_attention)
    prompts = [torch.tensor([text_tokenizer.bos_id, *text_tokenizer.encode(c)]) for c in ("a red circle", "")]

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    kw = dict(num_inference_steps=2, guidance_scale=2.0)
    if image_attention == "bidirectional":
        kw["num_iter"] = 3
    batched = generate_image_latents(noisy, prompts, 2, 3, generator=gens([3, 4]), **kw)
    alone = torch.cat(
        [generate_image_latents(noisy, [p], 2, 3, generator=gens([s]), **kw) for p, s in zip(prompts, (3, 4))]
    )
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    uncached = generate_image_latents(noisy, prompts, 2, 3, generator=gens([3, 4]), use_cache=False, **kw)
    torch.testing.assert_close(batched, uncached, rtol=1e-4, atol=1e-5)
    plain = generate_image_latents(clean, prompts, 2, 3, generator=gens([3, 4]), **kw)
    flat_noisy, flat_plain = batched.flatten(1, 2), plain.flatten(1, 2)  # (b, h*w, D)
    if image_attention == "causal":
        # the first latent is sampled before anything is fed back; every later one reads noisy inputs
        torch.testing.assert_close(flat_noisy[:, 0], flat_plain[:, 0])
    assert not torch.allclose(flat_noisy, flat_plain)


def test_input_noise_must_be_non_negative() -> None:
    assert FlowLossConfig().input_noise == 0.0
    with pytest.raises(ValueError, match="input_noise"):
        FlowLossConfig(input_noise=-0.1)
