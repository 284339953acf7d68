"""The main job end to end at smoke scale: every step runs, the report has every section, and a
second run skips the finished steps."""

import json
import re

from pipelines.quickstart import main


def test_quickstart_smoke_runs_end_to_end_and_resumes(tmp_path, capfd):
    out = tmp_path / "qs"
    report = main(["--out", str(out), "--preset", "smoke", "--model.base_channels", "8"])
    text = report.read_text()
    for section in ("## Stage 1: image tokenizer", "### Reconstructions", "### Training curves", "## Config"):
        assert section in text
    for name in ("shapes", "digits", "photos"):
        assert (out / "report" / f"recon_{name}.png").is_file()
        assert f"| {name} |" in text
    assert (out / "report" / "tokenizer_loss.png").is_file()
    assert (out / "tokenizer" / "final" / "model.safetensors").is_file()
    metrics = json.loads((out / "eval" / "tokenizer_metrics.json").read_text())
    assert set(metrics) == {"shapes", "digits", "photos"} and all("psnr" in m for m in metrics.values())
    # Stage 2: a trained decoder folder, judged samples, and its report section
    for section in ("## Stage 2: decoder", "### Text-to-image, judged", "### Captioning held-out images"):
        assert section in text
    for name in ("t2i_single.png", "digits.png", "captions_shapes.png", "decoder_loss.png"):
        assert (out / "report" / name).is_file(), name
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)  # every image the report shows is there
    assert len(links) >= 12 and all((out / "report" / link).is_file() for link in links), links
    assert "**single**" in text and "**two_objects**" in text  # category titles
    decoder = json.loads((out / "eval" / "decoder_metrics.json").read_text())
    assert set(decoder["text_to_image"]) >= {"single", "two_objects", "position", "count", "overall"}
    failures = decoder["text_to_image_failures"]
    assert set(failures) == set(decoder["text_to_image"]) - {"overall"}
    assert all(abs(sum(v[k] for k in v if k.startswith("objects_")) - 1) < 1e-9 for v in failures.values())
    assert "Why images fail" in text and "| fails_count |" in text
    # the judged images are the best of 4 by caption score; the same prompts sampled plainly sit beside them
    assert decoder["sampling"]["num_candidates"] == 4 and "best of 4 samples" in text
    assert set(decoder["plain_sampling"]) == set(decoder["text_to_image"]) | {"digits"}
    assert "| metric | score | plain sampling | target | met |" in text
    from transformers import pipeline

    import pipelines  # noqa: F401  (registers the task)

    t2i = pipeline("text-to-image", model=str(out / "model"))
    assert t2i("a red circle", progress_bar=False)[0]["image"].size == (32, 32)
    card = (out / "model" / "README.md").read_text()
    assert "judge.text_to_image.single" in card and "tokenizer.shapes.psnr" in card
    last = capfd.readouterr().out.strip().splitlines()[-2:]
    assert last[0].startswith("model:") and last[1].startswith("report:")

    main(["--out", str(out), "--preset", "smoke"])
    second = capfd.readouterr().out  # capfd: the steps print from child processes
    for step in ("data", "tokenizer", "decoder", "judge"):
        assert f"{step}: done, skipping" in second


def test_quickstart_continuous_variant_smoke(tmp_path, capsys):
    """--variant continuous: KL tokenizer, diffusion-head decoder, judged through the same steps; the
    folder generates through the pipeline with num_inference_steps, and one --out holds one variant."""
    import pytest
    from transformers import pipeline

    import pipelines  # noqa: F401  (registers the task)

    out = tmp_path / "qs"
    report = main(
        ["--out", str(out), "--preset", "smoke", "--variant", "continuous", "--model.base_channels", "8"]
    )
    assert "## Stage 2: decoder" in report.read_text()
    decoder = json.loads((out / "eval" / "decoder_metrics.json").read_text())
    assert decoder["sampling"]["num_inference_steps"] == 4
    assert f"temperature {decoder['sampling']['temperature']}, 4 head steps)" in report.read_text()
    t2i = pipeline("text-to-image", model=str(out / "model"))
    assert t2i.model.is_continuous
    image = t2i("a red circle", num_inference_steps=2, progress_bar=False)[0]["image"]
    assert image.size == (32, 32)
    with pytest.raises(SystemExit, match="holds a --variant continuous run"):
        main(["--out", str(out), "--preset", "smoke", "--variant", "discrete"])


def test_steps_run_in_a_child_process_that_returns_results_and_raises_errors():
    """The job runs each step in a spawned child, so its memory is returned when the step ends."""
    import os

    import pytest

    from pipelines.quickstart import in_child

    assert in_child(os.getpid) != os.getpid()
    assert in_child(sorted, [3, 1, 2]) == [1, 2, 3]
    with pytest.raises(ValueError, match="invalid literal"):
        in_child(int, "not a number")


def test_decoder_steps_must_be_positive(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="--decoder_steps must be >= 1, got 0"):
        main(["--out", str(tmp_path / "qs"), "--preset", "smoke", "--decoder_steps", "0"])


def test_preset_tokenizer_overrides_come_before_the_users(tmp_path, monkeypatch):
    """The demo's narrow tokenizer is a preset override; a user's --model.* on the command line wins."""
    import dataclasses

    import tokenizers_mm.train
    from pipelines.quickstart import PRESETS, step_tokenizer

    seen = []
    monkeypatch.setattr(tokenizers_mm.train, "main", lambda cfg: seen.append(cfg))
    assert PRESETS["demo"].tokenizer_overrides[:2] == ("--model.base_channels", "16")
    preset = dataclasses.replace(PRESETS["demo"], tokenizer_config="fsq_8x8.yaml")
    data = {"shapes": tmp_path / "s", "digits": tmp_path / "d"}
    for path in data.values():
        path.mkdir()
    step_tokenizer(tmp_path / "a", preset, data, [])
    step_tokenizer(tmp_path / "b", preset, data, ["--model.base_channels", "8"])
    assert [cfg.model["base_channels"] for cfg in seen] == [16, 8] and seen[0].batch_size == 32
    assert seen[0].max_steps == preset.tokenizer_steps and seen[0].model["fsq_entropy_weight"] == 0.05


def test_variants_set_their_configs_and_their_own_preset_sizes():
    """A variant picks its configs; the continuous demo trains fewer decoder steps (its head is dearer)."""
    from pipelines.quickstart import PRESETS, resolve_preset

    discrete, continuous = resolve_preset("demo", "discrete"), resolve_preset("demo", "continuous")
    assert (discrete.tokenizer_config, discrete.decoder_config) == ("fsq_8x8_joint.yaml", "shapes_cpu.yaml")
    assert (continuous.tokenizer_config, continuous.decoder_config) == ("kl_8x8.yaml", "shapes_kl_cpu.yaml")
    assert discrete.decoder_steps == PRESETS["demo"].decoder_steps == 200
    assert continuous.decoder_steps == 80 < discrete.decoder_steps
    assert continuous.decoder_overrides == discrete.decoder_overrides  # everything else is the preset's
    assert resolve_preset("default", "continuous").decoder_steps is None  # the config's max_steps


def test_report_names_how_images_were_sampled():
    from pipelines.quickstart import _sampling_words

    assert _sampling_words({"guidance_scale": 2.0, "temperature": 0.8}) == "CFG 2.0, temperature 0.8"
    linear = {"guidance_scale": 3.0, "cfg_schedule": "linear", "temperature": 0.8}
    assert _sampling_words(linear) == "CFG 3.0 (linear schedule), temperature 0.8"
    head = {"guidance_scale": 4.0, "temperature": 1.2, "num_inference_steps": 4}
    assert _sampling_words(head) == "CFG 4.0, temperature 1.2, 4 head steps"
    best = {**linear, "num_candidates": 4}
    assert _sampling_words(best).endswith("0.8, best of 4 samples by the model's own caption score")
    assert _sampling_words({**linear, "num_candidates": 1}) == _sampling_words(linear)


def test_decoder_trains_on_all_the_data_the_job_built(tmp_path, monkeypatch):
    """The decoder's --train_nums are the data step's sizes (a config's smaller train_nums would silently
    read only the first part of the shards), and the default presets build what their decoder configs
    were measured with."""
    import subprocess

    import yaml

    from pipelines.quickstart import DECODER_CONFIG_DIR, resolve_preset, step_decoder

    commands = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: commands.append(cmd))
    data = {"shapes": tmp_path / "s", "digits": tmp_path / "d"}
    for variant in ("discrete", "continuous"):
        preset = resolve_preset("default", variant)
        step_decoder(tmp_path / variant, preset, data, tmp_path / "tok")
        cmd = commands[-1]
        nums = json.loads(cmd[cmd.index("--train_nums") + 1])
        assert nums == [preset.shapes_num, preset.digits_num]
        config = yaml.safe_load((DECODER_CONFIG_DIR / preset.decoder_config).read_text())
        assert config["train_nums"] == nums, variant
