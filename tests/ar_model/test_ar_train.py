"""Short real Stage-2 runs: in-process, resumed, codes checks, and 2 processes under accelerate launch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch_helpers import cpu_env, launch_cmd, run_launch
from safetensors.torch import load_file
from tiny import (
    TINY_DECODER,
    TINY_TOKENIZER,
    final_validation_batches,
    tiny_train_config,
    validation_in_one_process,
)

from ar_model.generator import MMGenerator
from ar_model.train import TrainConfig, main, parse_args
from tokenizers_mm import ImageTokenizer
from tokenizers_mm.presets import preset_config


def _cfg(tmp_path: Path, tokenizer_dir: Path, **kw) -> TrainConfig:
    return tiny_train_config(tokenizer_dir, tmp_path / "run", **kw)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_short_run_learns_and_leaves_a_loadable_folder(tmp_path, tokenizer_dir):
    metrics = main(_cfg(tmp_path, tokenizer_dir, eval_every=15, sample_every=15))
    run = tmp_path / "run"
    losses = [r["loss"] for r in _log(run)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    for key in ("val_loss", "val_image_loss", "val_caption_loss", "tokens_per_s"):
        assert metrics[key] > 0
    assert [json.loads(x)["step"] for x in (run / "val_log.jsonl").read_text().splitlines()] == [15]
    assert (run / "samples" / "step-000015.png").is_file() and (run / "samples" / "final.png").is_file()
    gen = MMGenerator.from_pretrained(run / "final")
    images = gen.text_to_image(["a red circle", "the digit seven"], guidance_scale=2.0)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    captions = gen.image_to_text(images, max_new_tokens=6)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    # the saved decoder is the trained one
    saved = load_file(run / "final" / "model.safetensors")
    assert torch.equal(saved["model.norm.weight"], gen.decoder.model.norm.weight)


def test_grouped_codes_run_learns_generates_and_captions(tmp_path, tokenizer_dir):
    """``--model.code_group 2``: 2x2 codes per position; the loss and its code part fall, and the saved
    folder generates full-size images and captions them."""
    model = {**TINY_DECODER, "code_group": 2}
    metrics = main(_cfg(tmp_path, tokenizer_dir, model=model, eval_every=15, sample_every=0))
    run = tmp_path / "run"
    log = _log(run)
    losses, code = [r["loss"] for r in log], [r["code_loss"] for r in log]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]) and sum(code[-5:]) < 0.8 * sum(code[:5])
    for key in ("val_loss", "val_image_loss", "val_caption_loss"):
        assert metrics[key] > 0
    assert metrics["image_tokens"] == "discrete, 2x2 codes per position"
    gen = MMGenerator.from_pretrained(run / "final")
    assert (
        gen.decoder.config.code_group == 2
        and gen.decoder.config.vocab_size == gen.decoder.config.code_offset + 1
    )
    images = gen.text_to_image(["a red circle", "the digit seven"], guidance_scale=2.0, cfg_schedule="linear")
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    captions = gen.image_to_text(images, max_new_tokens=6)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, tokenizer_dir, optimizer):
    kw = dict(max_steps=10, save_every=5, log_every=5, ema_decay=0.9, optimizer=optimizer)
    main(_cfg(tmp_path, tokenizer_dir, **kw))
    run = tmp_path / "run"
    full = load_file(run / "final" / "model.safetensors")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-5"]
    # As if the run died after the step-5 checkpoint: resume redoes steps 6..10 exactly (EMA included).
    main(_cfg(tmp_path, tokenizer_dir, resume=True, **kw))
    resumed = load_file(run / "final" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_ema_run_keeps_the_raw_weights_and_logs_both_losses(tmp_path, tokenizer_dir):
    """With EMA on, ``final/`` holds the EMA weights and ``final_raw/`` the raw ones, which are exactly
    those of the same run without EMA (the average never feeds back into training); validation logs
    both, and the raw loss is the plain run's."""
    kw = dict(max_steps=6, save_every=0, log_every=3, eval_every=3, num_sample_prompts=0)
    ema_metrics = main(tiny_train_config(tokenizer_dir, tmp_path / "ema", ema_decay=0.5, **kw))
    plain_metrics = main(tiny_train_config(tokenizer_dir, tmp_path / "plain", **kw))
    plain = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    raw = load_file(tmp_path / "ema" / "final_raw" / "model.safetensors")
    ema = load_file(tmp_path / "ema" / "final" / "model.safetensors")
    assert plain.keys() == raw.keys() == ema.keys()
    for k in plain:
        assert torch.equal(plain[k], raw[k]), k
    assert any(not torch.equal(plain[k], ema[k]) for k in plain)
    assert ema_metrics["raw_val_loss"] == pytest.approx(plain_metrics["val_loss"], rel=1e-6)
    assert ema_metrics["val_loss"] != pytest.approx(plain_metrics["val_loss"], rel=1e-4)
    (logged,) = [json.loads(x) for x in (tmp_path / "ema" / "val_log.jsonl").read_text().splitlines()]
    (plain_logged,) = [json.loads(x) for x in (tmp_path / "plain" / "val_log.jsonl").read_text().splitlines()]
    assert logged["raw_val_loss"] == pytest.approx(plain_logged["val_loss"], rel=1e-6)
    assert not (tmp_path / "plain" / "final_raw").exists()
    assert MMGenerator.from_pretrained(tmp_path / "ema" / "final_raw").decoder.config.vocab_size > 0


def test_cached_codes_are_reextracted_when_the_request_changes(tmp_path, tokenizer_dir):
    from data.codes import load_codes

    kw = dict(max_steps=1, train_data=["shapes", "digits"], val_data=[], num_sample_prompts=0)
    main(_cfg(tmp_path, tokenizer_dir, train_nums=[64, 32], **kw))
    codes = tmp_path / "run" / "codes"
    assert [len(load_codes(codes / f"train-{i}")) for i in (0, 1)] == [64, 32]
    main(_cfg(tmp_path, tokenizer_dir, train_nums=[64, 48], **kw))
    assert [len(load_codes(codes / f"train-{i}")) for i in (0, 1)] == [64, 48]


def test_codes_from_another_tokenizer_are_refused(tmp_path, tokenizer_dir):
    from data.codes import CodesMismatchError
    from data.extract_codes import extract_codes

    torch.manual_seed(1)
    other = tmp_path / "other"
    ImageTokenizer(preset_config("fsq-8x8", resolution=32, **TINY_TOKENIZER)).save_pretrained(other)
    codes = extract_codes(other, "shapes", 64, 32, tmp_path / "codes", progress=False)
    with pytest.raises(CodesMismatchError):
        main(_cfg(tmp_path, tokenizer_dir, train_data=[], codes_data=[str(codes)], val_data=[]))


def test_bad_arguments_fail_before_any_work(tmp_path, tokenizer_dir):
    with pytest.raises(SystemExit):
        parse_args(["--tokenizer", str(tokenizer_dir), "--max_steps", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--tokenizer", str(tokenizer_dir), "--no_such_key", "1"])
    with pytest.raises(SystemExit):
        parse_args(["--preset", "tiny"])  # no tokenizer
    with pytest.raises(SystemExit):
        parse_args(["--tokenizer", str(tokenizer_dir), "--optimizer", "sgd"])
    with pytest.raises(SystemExit):  # one count for two sources
        parse_args(
            ["--tokenizer", str(tokenizer_dir), "--train_data", "[shapes, digits]", "--train_nums", "[5]"]
        )
    with pytest.raises(ValueError, match="raise max_len"):
        main(_cfg(tmp_path, tokenizer_dir, max_len=32, tokens_per_batch=64))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_process_run_keeps_ranks_identical(tmp_path, tokenizer_dir, optimizer):
    run = tmp_path / "run"
    cmd = launch_cmd([
        "-m", "ar_model.train", "--tokenizer", str(tokenizer_dir), "--preset", "tiny",
        "--model", json.dumps(TINY_DECODER), "--train_num", "160", "--val_num", "16",
        "--max_len", "256", "--tokens_per_batch", "512", "--max_steps", "6", "--warmup_steps", "1",
        "--save_every", "3", "--eval_every", "3", "--num_sample_prompts", "2", "--output_dir", str(run),
        "--optimizer", optimizer,
    ])  # fmt: skip
    proc = run_launch(cmd, cpu_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    digests = metrics["rank_param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (run / "checkpoints" / "step-3").is_dir()
    # each process validated its share of the batches; the sums added up give one process's losses
    one = validation_in_one_process(run, max_len=256, tokens_per_batch=512)
    for key in ("val_loss", "val_image_loss", "val_caption_loss"):
        assert metrics[key] == pytest.approx(one[key], rel=1e-5), key


def test_validation_shares_add_up_to_the_whole(tmp_path, tokenizer_dir):
    """``validation_loss`` with ``share=(rank, world)`` evaluates every ``world``-th batch; with the sums
    added over the shares (what ``reduce`` does across processes) it equals the unsplit losses."""
    from ar_model.train import validation_loss

    main(_cfg(tmp_path, tokenizer_dir, max_steps=2, num_sample_prompts=0, val_num=24))
    model, batches = final_validation_batches(tmp_path / "run", max_len=256, tokens_per_batch=512)
    cpu = torch.device("cpu")
    whole = validation_loss(model, batches, cpu)
    local: list[torch.Tensor] = []
    validation_loss(model, batches, cpu, share=(1, 3), reduce=lambda t: local.append(t) or t)
    validation_loss(model, batches, cpu, share=(2, 3), reduce=lambda t: local.append(t) or t)
    split = validation_loss(model, batches, cpu, share=(0, 3), reduce=lambda t: t + local[0] + local[1])
    assert split.keys() == whole.keys()
    for key in whole:
        assert split[key] == pytest.approx(whole[key], rel=1e-9), key
    alone = validation_loss(model, batches, cpu, share=(0, 3))  # one share alone is another number
    assert alone["val_loss"] != pytest.approx(whole["val_loss"], rel=1e-6)
