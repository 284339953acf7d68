"""One folder holds everything: save → load → generate is identical; the card; broken folders."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from transformers import AutoModelForImageTextToText

from ar_model.generator import REQUIRED, ComponentMismatchError, MMGenerator
from tokenizers_mm import ImageTokenizer


@pytest.fixture(scope="module")
def gen(model_dir) -> MMGenerator:
    return MMGenerator.from_pretrained(model_dir)


def test_save_load_generate_is_identical(gen, tmp_path):
    copy = gen.save_pretrained(tmp_path / "copy")
    again = MMGenerator.from_pretrained(copy)
    a = gen.text_to_image(["a red circle", "two green squares"], num_images_per_prompt=2, seed=4)
    b = again.text_to_image(["a red circle", "two green squares"], num_images_per_prompt=2, seed=4)
    assert torch.equal(a, b)
    kw = dict(max_new_tokens=6, temperature=1.0, seed=2)
    assert gen.image_to_text(a, **kw) == again.image_to_text(a, **kw)
    assert again.card["training"] == gen.card["training"]
    # AutoModelForImageTextToText maps our config type to the whole folder's class.
    auto = AutoModelForImageTextToText.from_pretrained(copy)
    assert isinstance(auto, MMGenerator) and torch.equal(auto.text_to_image(["a red circle"], seed=4), a[:1])


def test_auto_class_arguments_subfolder_and_proxies(gen, tmp_path):
    """transformers' Auto classes pass subfolder/force_download/proxies: a subfolder is honoured (as in a
    repo holding several models), proxies are refused clearly rather than silently ignored."""
    gen.save_pretrained(tmp_path / "repo" / "t2i")
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path / "repo", subfolder="t2i")
    assert isinstance(auto, MMGenerator)
    prompt = ["a red circle"]
    assert torch.equal(auto.text_to_image(prompt, seed=4), gen.text_to_image(prompt, seed=4))
    with pytest.raises(FileNotFoundError, match="no subfolder 'nope'"):
        MMGenerator.from_pretrained(tmp_path / "repo", subfolder="nope")
    with pytest.raises(ValueError, match="HTTPS_PROXY"):
        MMGenerator.from_pretrained(tmp_path / "repo" / "t2i", proxies={"https": "http://proxy:3128"})


def test_the_model_card_records_data_steps_metrics_and_samples(gen, model_dir, tmp_path):
    card = (model_dir / "README.md").read_text()
    header = card.split("---")[1]
    for line in ("pipeline_tag: text-to-image", "library_name: mmgen-toolkit", "- image-to-text"):
        assert line in header
    assert "| steps | 30 |" in card and '| data.train_data | ["shapes", "digits"] |' in card
    assert "![samples](samples.png)" in card and (model_dir / "samples.png").is_file()
    gen.card["metrics"] = {"text_to_image": {"single": 0.5}}
    out = gen.save_pretrained(tmp_path / "with_metrics")
    assert "| text_to_image.single | 0.5 |" in (out / "README.md").read_text()
    assert (out / "samples.png").read_bytes() == (model_dir / "samples.png").read_bytes()
    del gen.card["metrics"]


@pytest.mark.parametrize("part", REQUIRED)
def test_a_folder_missing_a_component_is_a_clear_error(model_dir, tmp_path, part):
    broken = shutil.copytree(model_dir, tmp_path / "broken")
    target = broken / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=rf"missing \['{part}'\]"):
        MMGenerator.from_pretrained(broken)


def test_another_image_tokenizer_is_refused(model_dir, tmp_path, make_tokenizer):
    swapped = shutil.copytree(model_dir, tmp_path / "swapped")
    shutil.rmtree(swapped / "image_tokenizer")
    make_tokenizer(swapped / "image_tokenizer", seed=1)  # same codebook size, other weights
    assert ImageTokenizer.from_pretrained(swapped / "image_tokenizer").config.codebook_size == 1000
    with pytest.raises(ComponentMismatchError, match="not the image tokenizer this decoder was trained with"):
        MMGenerator.from_pretrained(swapped)
    from transformers import pipeline

    import pipelines  # noqa: F401

    with pytest.raises(ValueError, match="not the image tokenizer this decoder was trained with"):
        pipeline("text-to-image", model=str(swapped))


def test_another_text_tokenizer_is_refused(model_dir, tmp_path):
    swapped = shutil.copytree(model_dir, tmp_path / "swapped")
    manifest = json.loads((swapped / "mm_generator.json").read_text())
    manifest["text_tokenizer_sha256"] = "0" * 64
    (swapped / "mm_generator.json").write_text(json.dumps(manifest))
    with pytest.raises(ComponentMismatchError, match="text tokenizer"):
        MMGenerator.from_pretrained(swapped)


class _Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.write_text, (pathlib.Path(MARKER), "pwned"))


MARKER = ""


def test_a_pickled_checkpoint_is_never_loaded(model_dir, tmp_path):
    global MARKER
    MARKER = str(tmp_path / "marker")
    planted = shutil.copytree(model_dir, tmp_path / "planted")
    (planted / "model.safetensors").unlink()
    (planted / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MMGenerator.from_pretrained(planted)
    assert not (tmp_path / "marker").exists()


def test_a_failed_save_leaves_the_previous_folder_intact(gen, tmp_path, monkeypatch):
    target = gen.save_pretrained(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}

    def broken(path):
        raise OSError("disk full")

    monkeypatch.setattr(gen.text_tokenizer, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        gen.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left behind
    MMGenerator.from_pretrained(target)
