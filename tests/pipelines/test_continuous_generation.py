"""A diffusion-head model behind the same API and pipelines as a discrete one.

The model here is untrained (random decoder and head, a ``kl-8x8`` tokenizer with unit latent
statistics): these tests check the plumbing and its invariants (determinism, batching, CFG at scale
1, shortcut steps, save/load, captions from continuous latents), not image quality.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import pipeline

import pipelines  # noqa: F401  (registers the tasks)
from ar_model.config import vocab_layout
from ar_model.generation import generate_tokens
from ar_model.generator import ComponentMismatchError, MMGenerator
from ar_model.latent_generation import generate_image_latents
from ar_model.modeling import MMDecoderForCausalLM
from ar_model.presets import preset_config
from ar_model.text_tokenizer import train_text_tokenizer
from data.shapes import generate_shapes
from tokenizers_mm import ImageTokenizer
from tokenizers_mm.presets import preset_config as tokenizer_preset


def _captions(n: int = 200) -> list[str]:
    return [sample.caption for sample in generate_shapes(n, resolution=32, seed=0)]


@pytest.fixture(scope="module")
def continuous_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("continuous")
    torch.manual_seed(0)
    tok_cfg = tokenizer_preset(
        "kl-8x8", resolution=32, base_channels=8, channel_mult=[1, 2, 2], mid_blocks=0, norm_groups=4
    )
    image_tok = ImageTokenizer(tok_cfg)
    dim = image_tok.config.token_dim
    image_tok.config.latent_mean, image_tok.config.latent_std = [0.0] * dim, [1.0] * dim
    text_tok = train_text_tokenizer(_captions(), root / "sp", vocab_size=600)
    cfg = preset_config(
        "tiny",
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        latent_dim=dim,
        diffusion_head={"width": 32, "depth": 1},
        **vocab_layout(text_tok, 1),
    )
    decoder = MMDecoderForCausalLM(cfg)
    # A random head outputs ~0 velocity (its output layer is zero at init): give it weights so that
    # samples depend on the condition, the noise and the step count.
    with torch.no_grad():
        for p in decoder.diffusion_head.parameters():
            p.normal_(0, 0.2)
    MMGenerator(decoder, text_tok, image_tok).save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def gen(continuous_dir) -> MMGenerator:
    return MMGenerator.from_pretrained(continuous_dir)


def test_text_to_image_through_the_pipeline(continuous_dir):
    t2i = pipeline("text-to-image", model=str(continuous_dir))
    out = t2i(
        ["a red circle", "two blue squares"],
        num_images_per_prompt=2,
        num_inference_steps=2,
        progress_bar=False,
    )
    assert [len(x) for x in out] == [2, 2] and out[0][0]["image"].size == (32, 32)
    again = t2i(
        "a red circle", num_images_per_prompt=2, num_inference_steps=2, generator=5, progress_bar=False
    )
    same = t2i(
        "a red circle", num_images_per_prompt=2, num_inference_steps=2, generator=5, progress_bar=False
    )
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(again, same))


def test_batched_prompts_equal_one_at_a_time(gen):
    prompts = ["a red circle", "two blue squares left of a yellow triangle", ""]
    batched = gen.text_to_tokens(prompts, num_images_per_prompt=2, num_inference_steps=2, seed=3)
    alone = torch.cat(
        [gen.text_to_tokens(p, num_images_per_prompt=2, num_inference_steps=2, seed=3) for p in prompts]
    )
    assert batched.shape == (6, 8, 8, gen.config.latent_dim)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)  # left padding: float rounding only


def test_steps_temperature_and_guidance_change_the_latents(gen):
    base = gen.text_to_tokens("a red circle", num_inference_steps=4, seed=1, guidance_scale=1.0)
    for kwargs in (
        {"num_inference_steps": 1},
        {"temperature": 0.5},
        {"guidance_scale": 3.0},
        {"sampler": "heun"},
    ):
        other = gen.text_to_tokens(
            "a red circle", seed=1, **{"num_inference_steps": 4, "guidance_scale": 1.0, **kwargs}
        )
        assert not torch.equal(base, other), kwargs


def test_guidance_scale_one_equals_no_guidance(gen):
    cfg = gen.decoder.config
    tok = gen.text_tokenizer
    prompt = [torch.tensor([tok.bos_id, *tok.encode("a red circle")])]
    g = [torch.Generator().manual_seed(0)]
    a = generate_image_latents(gen.decoder, prompt, 8, 8, guidance_scale=1.0, generator=g)
    g = [torch.Generator().manual_seed(0)]
    b = generate_image_latents(
        gen.decoder, prompt, 8, 8, guidance_scale=1.0, cfg_schedule="linear", generator=g
    )
    assert torch.equal(a, b) and a.shape == (1, 8, 8, cfg.latent_dim)


def test_cached_generation_equals_uncached(gen):
    tok = gen.text_tokenizer
    prompt = [torch.tensor([tok.bos_id, *tok.encode("two green squares")])]
    kw = dict(guidance_scale=2.0, num_inference_steps=2)
    a = generate_image_latents(gen.decoder, prompt, 4, 4, generator=[torch.Generator().manual_seed(2)], **kw)
    b = generate_image_latents(
        gen.decoder, prompt, 4, 4, generator=[torch.Generator().manual_seed(2)], use_cache=False, **kw
    )
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_save_load_generate_is_identical(gen, tmp_path):
    again = MMGenerator.from_pretrained(gen.save_pretrained(tmp_path / "copy"))
    a = gen.text_to_image(["a red circle"], num_inference_steps=2, seed=7)
    b = again.text_to_image(["a red circle"], num_inference_steps=2, seed=7)
    assert torch.equal(a, b)


def test_captions_from_continuous_latents(gen):
    images = gen.text_to_image(["a red circle", "two blue squares"], num_inference_steps=1, seed=0)
    captions = gen.image_to_text(images, max_new_tokens=5, temperature=1.0, seed=0)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    # Reference: the same prompt as one uncached forward pass with the latents in place.
    cfg = gen.decoder.config
    latents = gen.image_tokenizer.normalize_latents(gen.encode_images(images[:1]))  # (1, 8, 8, D)
    tok = gen.text_tokenizer
    ids = torch.tensor(
        [[tok.bos_id, tok.boi_id, tok.h_token(8), tok.w_token(8), *[cfg.latent_token_id] * 64, tok.eoi_id]]
    )
    lat = torch.zeros(1, 69, cfg.latent_dim)
    lat[0, 4:68] = latents.reshape(64, -1)
    mask = torch.zeros(1, 69, dtype=torch.bool)
    mask[0, 4:68] = True
    from ar_model.positions import multimodal_positions

    pos = multimodal_positions([("text", 4), ("image", (8, 8)), ("text", 1)], cfg.rope_scheme)[None]
    greedy = generate_tokens(
        gen.decoder, ids, pos, 3, prompt_latents=lat, prompt_latent_mask=mask, use_cache=False
    )
    cached = generate_tokens(gen.decoder, ids, pos, 3, prompt_latents=lat, prompt_latent_mask=mask)
    assert torch.equal(greedy, cached)


def test_a_discrete_tokenizer_with_a_continuous_decoder_is_refused(gen, make_tokenizer, tmp_path):
    discrete = ImageTokenizer.from_pretrained(make_tokenizer(tmp_path / "fsq"))
    with pytest.raises(ComponentMismatchError, match="latent dimension mismatch"):
        MMGenerator(gen.decoder, gen.text_tokenizer, discrete)


def test_guidance_interval_reaches_the_head_and_outside_it_is_unguided(gen, continuous_dir):
    kw = dict(num_inference_steps=2, seed=4, guidance_scale=3.0)
    full = gen.text_to_tokens("a red circle", **kw)
    assert torch.equal(gen.text_to_tokens("a red circle", guidance_interval=(0.0, 1.0), **kw), full)
    late = gen.text_to_tokens("a red circle", guidance_interval=(0.5, 1.0), **kw)
    assert not torch.equal(late, full)
    # no head step starts in (0.1, 0.4): the uncond rows still run through the trunk (float rounding of
    # the larger batch only), the head is never guided
    none = gen.text_to_tokens("a red circle", guidance_interval=(0.1, 0.4), **kw)
    plain = gen.text_to_tokens("a red circle", num_inference_steps=2, seed=4, guidance_scale=1.0)
    torch.testing.assert_close(none, plain, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="guidance_interval"):
        gen.text_to_tokens("a red circle", guidance_interval=(0.6, 0.2), **kw)
    t2i = pipeline("text-to-image", model=str(continuous_dir))
    out = t2i(
        "a red circle",
        guidance_interval=(0.5, 1.0),
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=4,
        progress_bar=False,
    )
    assert np.array_equal(np.asarray(out[0]["image"]), gen.decode_tokens(late)[0].permute(1, 2, 0).numpy())
