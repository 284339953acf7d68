"""pipeline("text-to-image"): shapes, determinism, batching invariance, progress bar, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

import pipelines  # noqa: F401  (registers the tasks)
from pipelines import TextToImagePipeline


@pytest.fixture(scope="module")
def t2i(model_dir):
    return pipeline("text-to-image", model=str(model_dir))


def _arrays(results) -> list[np.ndarray]:
    return [np.asarray(r["image"]) for r in results]


def test_loads_through_transformers_pipeline_on_cpu_fp32(t2i):
    assert isinstance(t2i, TextToImagePipeline)
    assert t2i.device.type == "cpu"
    assert t2i.model.decoder.get_input_embeddings().weight.dtype == torch.float32


def test_returns_the_requested_number_of_pil_images_of_the_right_size(t2i):
    out = t2i("a red circle", num_images_per_prompt=3, generator=0, progress_bar=False)
    assert len(out) == 3
    for item in out:
        assert set(item) == {"image"} and isinstance(item["image"], Image.Image)
        assert item["image"].size == (32, 32) and item["image"].mode == "RGB"
    several = t2i(["a red circle", "two blue squares"], num_images_per_prompt=2, progress_bar=False)
    assert [len(x) for x in several] == [2, 2]


def test_same_seed_same_images_and_other_seed_other_images(t2i):
    a = _arrays(t2i("a green triangle", num_images_per_prompt=2, generator=7, progress_bar=False))
    b = _arrays(t2i("a green triangle", num_images_per_prompt=2, generator=7, progress_bar=False))
    c = _arrays(t2i("a green triangle", num_images_per_prompt=2, generator=8, progress_bar=False))
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))
    assert (a[0] != a[1]).any()  # two images of one prompt are different samples
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    d = _arrays(t2i("a green triangle", generator=g1, progress_bar=False))
    e = _arrays(t2i("a green triangle", generator=g2, progress_bar=False))
    assert (d[0] == e[0]).all()


def test_a_list_of_prompts_is_batched_and_equals_one_prompt_at_a_time(t2i):
    prompts = ["a red circle", "two blue squares left of a yellow triangle", ""]
    batched = t2i(prompts, num_images_per_prompt=2, generator=11, progress_bar=False)
    for prompt, images in zip(prompts, batched):
        alone = t2i(prompt, num_images_per_prompt=2, generator=11, progress_bar=False)
        assert all((x == y).all() for x, y in zip(_arrays(images), _arrays(alone)))
    tiny_batches = t2i(prompts, num_images_per_prompt=2, generator=11, batch_size=1, progress_bar=False)
    for a, b in zip(batched, tiny_batches):
        assert all((x == y).all() for x, y in zip(_arrays(a), _arrays(b)))


def test_guidance_changes_the_images_and_scale_one_is_unguided(t2i, model_dir):
    one = _arrays(t2i("a red circle", guidance_scale=1.0, generator=3, progress_bar=False))
    gen = t2i.model
    codes = gen.text_to_tokens(["a red circle"], guidance_scale=1.0, seed=3)
    assert (np.asarray(one[0]) == gen.decode_tokens(codes)[0].permute(1, 2, 0).numpy()).all()
    strong = _arrays(t2i("a red circle", guidance_scale=5.0, generator=3, progress_bar=False))
    assert (one[0] != strong[0]).any()


def test_progress_bar_can_be_turned_off(t2i, capsys):
    t2i("a red circle", generator=0)
    assert "image tokens" in capsys.readouterr().err
    t2i("a red circle", generator=0, progress_bar=False)
    assert "image tokens" not in capsys.readouterr().err


def test_other_sizes_on_the_token_grid_are_generated(t2i):
    out = t2i("a red circle", height=16, width=24, generator=0, progress_bar=False)
    assert out[0]["image"].size == (24, 16)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"prompts": []}, ValueError, "empty list"),
        ({"prompts": ["a red circle", 3]}, TypeError, "item 1 is a int"),
        ({"prompts": None}, TypeError, "string or a list of strings"),
        ({"height": 30}, ValueError, "multiple of 4"),
        ({"width": 0}, ValueError, "multiple of 4"),
        ({"guidance_scale": -1.0}, ValueError, "guidance_scale must be ≥ 0"),
        ({"num_images_per_prompt": 0}, ValueError, "num_images_per_prompt must be an integer ≥ 1"),
        ({"temperature": -0.5}, ValueError, "temperature must be ≥ 0"),
        ({"generator": "seed"}, TypeError, "generator must be a torch.Generator or an int"),
        ({"steps": 4}, TypeError, "unexpected arguments ['steps']"),
        ({"guidance_interval": (0.5, 1.0)}, ValueError, "this model samples discrete codes"),
    ],
)
def test_bad_arguments_get_a_clear_error(t2i, kwargs, error, message):
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts", "a red circle")
    with pytest.raises(error) as info:
        t2i(prompts, progress_bar=False, **kwargs)
    assert message in str(info.value)


def test_a_prompt_longer_than_the_context_is_truncated_with_a_warning(t2i):
    context = t2i.model.config.max_position
    long = " ".join(["a red circle left of a blue square"] * context)  # well over the context
    with pytest.warns(UserWarning, match="truncated"):
        out = t2i(long, generator=0, progress_bar=False)
    assert out[0]["image"].size == (32, 32)


def test_num_inference_steps_is_ignored_with_a_warning_by_a_discrete_model(t2i):
    with pytest.warns(UserWarning, match="num_inference_steps"):
        a = t2i("a red circle", generator=0, num_inference_steps=4, progress_bar=False)
    b = t2i("a red circle", generator=0, progress_bar=False)
    assert (np.asarray(a[0]["image"]) == np.asarray(b[0]["image"])).all()


def test_num_candidates_keeps_the_candidate_with_the_best_caption_score(t2i, monkeypatch):
    gen = t2i.model
    prompts = ["a red circle", "two blue squares left of a yellow triangle"]
    kw = dict(guidance_scale=2.0, temperature=1.0, seed=4)
    seen = {}
    real = type(gen).caption_scores

    def spy(self, tokens, captions, **k):  # the real scorer, its inputs and outputs kept
        seen["tokens"], seen["captions"] = tokens.clone(), list(captions)
        seen["scores"] = real(self, tokens, captions, **k)
        return seen["scores"]

    monkeypatch.setattr(type(gen), "caption_scores", spy)
    best = gen.text_to_tokens(prompts, num_images_per_prompt=2, num_candidates=3, **kw)  # (4, h, w)
    assert best.shape[0] == 4 and seen["tokens"].shape[0] == 12
    assert seen["captions"] == [p for p in prompts for _ in range(6)]
    groups = seen["scores"].view(4, 3)
    candidates = seen["tokens"].view(4, 3, *best.shape[1:])
    assert torch.equal(best, candidates[torch.arange(4), groups.argmax(1)])
    # candidate 0 of every image is the plain sample; the other candidates are other draws
    plain = gen.text_to_tokens(prompts, num_images_per_prompt=2, **kw)
    assert torch.equal(candidates[:, 0], plain)
    assert all(not torch.equal(candidates[i, 0], candidates[i, 1]) for i in range(4))
    assert torch.equal(gen.text_to_tokens(prompts, num_images_per_prompt=2, num_candidates=1, **kw), plain)
    # every candidate and its score, from one call
    tokens, scores = gen.text_to_token_candidates(prompts, num_images_per_prompt=2, num_candidates=3, **kw)
    assert torch.equal(tokens, candidates) and torch.equal(scores, groups)
    assert gen.text_to_token_candidates(prompts, num_candidates=1, **kw)[1] is None
    # through the pipeline: the reranked images, and the same for a prompt alone
    out = _arrays(t2i(prompts[0], num_images_per_prompt=2, num_candidates=3, generator=4, guidance_scale=2.0,
                      temperature=1.0, progress_bar=False))  # fmt: skip
    pixels = gen.decode_tokens(best[:2]).permute(0, 2, 3, 1).numpy()  # (2, H, W, 3)
    assert all((x == y).all() for x, y in zip(out, pixels))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_num_candidates_must_be_a_positive_integer(t2i, bad):
    with pytest.raises(ValueError, match="num_candidates"):
        t2i("a red circle", num_candidates=bad, progress_bar=False)


def test_the_judge_gets_plain_samples_from_the_best_of_c_pass(t2i):
    """``ar_model.evaluate._generate(..., plain=True)``: the reranked images and candidate 0 of each, which
    are exactly what best-of-3 and plain sampling give, from one sampling pass."""
    from ar_model.evaluate import _generate

    gen = t2i.model
    prompts = ["a red circle", "two blue squares left of a yellow triangle", "the digit four"]
    kw = dict(guidance_scale=2.0, temperature=1.0)
    calls = []
    real = type(gen).text_to_token_candidates

    def count(self, *a, **k):
        calls.append(k.get("num_candidates"))
        return real(self, *a, **k)

    type(gen).text_to_token_candidates = count
    try:
        best, first = _generate(gen, prompts, 7, {**kw, "num_candidates": 3}, plain=True)
    finally:
        type(gen).text_to_token_candidates = real
    assert calls == [3]
    assert torch.equal(best, gen.text_to_image(prompts, seed=7, num_candidates=3, **kw))
    assert torch.equal(first, gen.text_to_image(prompts, seed=7, **kw))
    assert not torch.equal(best, first)  # reranking changed at least one image
