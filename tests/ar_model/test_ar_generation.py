"""Generation: cached == uncached, left padding, CFG, image-code masking, positions, sampling."""

from __future__ import annotations

import pytest
import torch

from ar_model.config import MMDecoderConfig, vocab_layout
from ar_model.generation import generate_image_codes, generate_tokens, guidance_scale_at, sample_logits
from ar_model.modeling import MMDecoderForCausalLM
from ar_model.positions import multimodal_positions
from ar_model.sequence import build_sequence, text_to_image_document
from ar_model.text_tokenizer import TextTokenizer

NUM_CODES = 48


def _model(tok: TextTokenizer, scheme: str = "rope_tv", seed: int = 0) -> MMDecoderForCausalLM:
    torch.manual_seed(seed)
    cfg = MMDecoderConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rope_scheme=scheme,
        initializer_range=0.2,  # peaky logits: no near-ties for greedy decoding
        **vocab_layout(tok, NUM_CODES),
    )
    return MMDecoderForCausalLM(cfg).eval()


def _prompts(tok: TextTokenizer) -> list[torch.Tensor]:
    captions = ["a red circle", "two blue stars above a green square", ""]  # different lengths, one empty
    return [torch.tensor([tok.bos_id, *tok.encode(c)]) for c in captions]


# ----------------------------------------------------------------------------- text
def test_text_cached_equals_uncached_and_per_row(text_tokenizer: TextTokenizer) -> None:
    model = _model(text_tokenizer)
    prompts = _prompts(text_tokenizer)
    positions = [multimodal_positions([("text", len(p))], "rope_tv") for p in prompts]
    kw = dict(max_new_tokens=12, eos_id=-1)  # no early stop
    cached = generate_tokens(model, prompts, positions, **kw)
    uncached = generate_tokens(model, prompts, positions, use_cache=False, **kw)
    assert cached.shape == (3, 12) and torch.equal(cached, uncached)
    for r, p in enumerate(prompts):  # left padding changes nothing
        alone = generate_tokens(model, [p], [positions[r]], **kw)
        assert torch.equal(alone[0], cached[r])


def test_generated_ids_are_normal_tensors_that_can_be_trained_on(text_tokenizer: TextTokenizer) -> None:
    """Sampling runs under inference mode; what it returns must still feed a training step (inference
    tensors cannot be saved for backward), with the same values as under no_grad."""
    model = _model(text_tokenizer)
    prompts = _prompts(text_tokenizer)
    tokens = generate_tokens(model, prompts, None, 5, eos_id=-1)
    codes = generate_image_codes(model, prompts, 2, 2, generator=torch.Generator().manual_seed(0))
    for out in (tokens, codes):
        assert not out.is_inference()
    with torch.no_grad():  # the same ids as the loops under plain no_grad
        assert torch.equal(tokens, generate_tokens.__wrapped__(model, prompts, None, 5, eos_id=-1))
        seeded = torch.Generator().manual_seed(0)
        again = generate_image_codes.__wrapped__(model, prompts, 2, 2, generator=seeded)
        assert torch.equal(codes, again)
    model.train()
    ids = torch.cat([tokens, codes.flatten(1)], dim=1)  # (b, 5 + 4)
    model(input_ids=ids, labels=ids).loss.backward()  # raises on an inference tensor saved for backward
    assert model.model.embed_tokens.weight.grad is not None
    model.eval()


def test_text_generation_continues_after_an_image(text_tokenizer: TextTokenizer) -> None:
    """A caption after an image: the new tokens' positions continue the prompt's multimodal positions."""
    model = _model(text_tokenizer)
    codes = torch.randint(0, NUM_CODES, (2, 3), generator=torch.Generator().manual_seed(0))
    seq = build_sequence([("image", codes), ("text", "")], text_tokenizer)
    prompt_ids, prompt_pos = seq.input_ids[:-1], seq.positions[:-1]  # drop <eos>: "<bos> <boi> .. <eoi>"
    out = generate_tokens(model, prompt_ids[None], prompt_pos[None], 6, eos_id=-1)
    # Teacher-forced check: the full sequence's greedy predictions reproduce the generated tokens.
    full_ids = torch.cat([prompt_ids, out[0]])
    segments = [*seq.position_segments[:-1], ("text", 1 + 6)]  # <eoi> and the new text
    pos = multimodal_positions(segments, "rope_tv")
    with torch.no_grad():
        logits = model(full_ids[None], pos[None]).logits[0]
    n = prompt_ids.shape[0]
    assert torch.equal(logits[n - 1 : -1].argmax(-1), out[0])


def test_text_generation_samples_text_ids_only(text_tokenizer: TextTokenizer) -> None:
    model = _model(text_tokenizer)
    with torch.no_grad():  # make image codes overwhelmingly likely
        model.lm_head.weight[model.config.code_offset :] *= 50
    prompts = _prompts(text_tokenizer)
    text = generate_tokens(model, prompts, None, 5, eos_id=-1, temperature=1.0)
    assert text.max() < model.config.text_vocab_size
    anything = generate_tokens(model, prompts, None, 5, eos_id=-1, allowed_range=(0, model.config.vocab_size))
    assert anything.min() >= model.config.code_offset


def test_eos_stops_a_row(text_tokenizer: TextTokenizer) -> None:
    model = _model(text_tokenizer)
    prompts = _prompts(text_tokenizer)[:1]
    first = generate_tokens(model, prompts, None, 4, eos_id=-1)
    stopped = generate_tokens(model, prompts, None, 4, eos_id=int(first[0, 1]))
    assert stopped[0, :2].tolist() == first[0, :2].tolist()
    assert (stopped[0, 2:] == model.config.pad_id).all()


# ----------------------------------------------------------------------------- images
@pytest.mark.parametrize("scheme", ["rope_tv", "mrope"])
def test_image_cached_equals_uncached(text_tokenizer: TextTokenizer, scheme: str) -> None:
    model = _model(text_tokenizer, scheme)
    prompts = _prompts(text_tokenizer)
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, guidance_scale=3.0)):
        a = generate_image_codes(model, prompts, 2, 3, generator=torch.Generator().manual_seed(0), **kw)
        b = generate_image_codes(
            model, prompts, 2, 3, generator=torch.Generator().manual_seed(0), use_cache=False, **kw
        )
        assert torch.equal(a, b), kw


def test_image_codes_shape_range_and_determinism(text_tokenizer: TextTokenizer) -> None:
    model = _model(text_tokenizer)
    prompts = _prompts(text_tokenizer)
    kw = dict(temperature=1.0, top_p=0.9, guidance_scale=2.0, cfg_schedule="linear")
    a = generate_image_codes(model, prompts, 3, 5, generator=torch.Generator().manual_seed(7), **kw)
    b = generate_image_codes(model, prompts, 3, 5, generator=torch.Generator().manual_seed(7), **kw)
    c = generate_image_codes(model, prompts, 3, 5, generator=torch.Generator().manual_seed(8), **kw)
    assert a.shape == (3, 3, 5) and a.dtype == torch.long
    assert a.min() >= 0 and a.max() < NUM_CODES  # codes, i.e. ids inside the image-code range
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_image_logits_outside_the_code_range_are_never_sampled(text_tokenizer: TextTokenizer) -> None:
    """Make text ids overwhelmingly likely: generation must still return codes only."""
    model = _model(text_tokenizer)
    with torch.no_grad():
        start, stop = model.config.image_code_range
        model.lm_head.weight[:start] *= 50
        model.lm_head.weight[stop:] *= 50
    codes = generate_image_codes(model, _prompts(text_tokenizer), 2, 2, temperature=0.0)
    assert codes.min() >= 0 and codes.max() < NUM_CODES


def test_cfg_scale_one_equals_cond_only(text_tokenizer: TextTokenizer) -> None:
    model = _model(text_tokenizer)
    prompts = _prompts(text_tokenizer)
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=10)):
        batched = generate_image_codes(
            model, prompts, 3, 2, use_cfg=True, generator=torch.Generator().manual_seed(1), **kw
        )
        cond = generate_image_codes(
            model, prompts, 3, 2, use_cfg=False, generator=torch.Generator().manual_seed(1), **kw
        )
        assert torch.equal(batched, cond), kw


def test_greedy_codes_agree_with_teacher_forcing(text_tokenizer: TextTokenizer) -> None:
    """Positions of generated codes follow build_sequence: re-reading the result predicts the same codes."""
    model = _model(text_tokenizer)
    caption = "two blue stars"
    prompt = torch.tensor([text_tokenizer.bos_id, *text_tokenizer.encode(caption)])
    codes = generate_image_codes(model, [prompt], 3, 4, temperature=0.0)[0]  # (3, 4)
    seq = build_sequence(text_to_image_document(caption, codes), text_tokenizer)
    with torch.no_grad():
        logits = model(seq.input_ids[None], seq.positions[None]).logits[0]
    first = seq.image_spans[0][0]
    start, stop = model.config.image_code_range
    predicted = logits[first - 1 : first + 11, start:stop].argmax(-1)  # (12,)
    assert torch.equal(predicted, codes.flatten())


# ----------------------------------------------------------------------------- sampling
def test_sample_logits() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
    assert sample_logits(logits, temperature=0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    assert sample_logits(logits, 1.0, top_k=1, generator=g).tolist() == [1, 0]
    assert sample_logits(logits, 1.0, top_p=1e-6, generator=g).tolist() == [1, 0]
    draws = torch.stack([sample_logits(logits, 1.0, top_k=2, generator=g) for _ in range(100)])  # (100, b)
    assert set(draws[:, 0].tolist()) == {1, 3} and set(draws[:, 1].tolist()) == {0, 3}
    draws = torch.stack([sample_logits(logits, 1.0, top_p=0.7, generator=g) for _ in range(100)])
    assert set(draws[:, 0].tolist()) == {1, 3}  # p(1) = .64 < .7, so 3 joins the nucleus
    with pytest.raises(ValueError):
        sample_logits(logits, -1.0)


def test_guidance_schedule() -> None:
    assert guidance_scale_at(3.0, "constant", 0, 10) == 3.0
    assert [guidance_scale_at(3.0, "linear", t, 4) for t in range(4)] == [1.5, 2.0, 2.5, 3.0]
    with pytest.raises(ValueError):
        guidance_scale_at(3.0, "cosine", 0, 4)
