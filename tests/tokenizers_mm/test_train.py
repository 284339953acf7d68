"""Short real training runs: in-process, resumed, and as 2 processes under accelerate launch."""

import json
from pathlib import Path

import pytest
import torch
from launch_helpers import cpu_env, launch_cmd, run_launch
from safetensors.torch import load_file

from tokenizers_mm import ImageTokenizer
from tokenizers_mm.train import TrainConfig, main

TINY_MODEL = {"base_channels": 8, "channel_mult": [1, 2, 2], "mid_blocks": 0, "norm_groups": 4}


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(
        preset="fsq-8x8",
        model=dict(TINY_MODEL),
        train_num=256,
        eval_num=32,
        batch_size=32,
        max_steps=30,
        warmup_steps=2,
        lr=3e-3,
        log_every=1,
        save_every=0,
        output_dir=str(tmp_path / "run"),
    )
    base.update(kw)
    return TrainConfig(**base)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["rec_loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_short_run_lowers_loss_and_leaves_a_loadable_folder(tmp_path):
    metrics = main(_cfg(tmp_path))
    run = tmp_path / "run"
    losses = _losses(run)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    for key in ("psnr", "ssim", "codebook_usage", "perplexity"):
        assert key in metrics
    assert json.loads((run / "metrics.json").read_text())["psnr"] == pytest.approx(metrics["psnr"])
    assert (run / "reconstructions.png").is_file()
    model = ImageTokenizer.from_pretrained(run / "final")
    assert model.config.bottleneck == "fsq"


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfg = _cfg(tmp_path, max_steps=12, save_every=6, train_num=128, log_every=3)
    main(cfg)
    run = tmp_path / "run"
    full = load_file(run / "final" / "model.safetensors")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-6"]
    # Pretend the run died after the step-6 checkpoint: resume must redo steps 7..12 exactly.
    main(_cfg(tmp_path, max_steps=12, save_every=6, train_num=128, log_every=3, resume=True))
    resumed = load_file(run / "final" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_channels_last_training_follows_the_usual_layout(tmp_path):
    """NHWC training (the default) is a memory layout, not another model: its losses follow the NCHW
    run's to float rounding, and the final folder holds ordinary contiguous weights."""
    kw = dict(max_steps=8, train_num=64, log_every=1)
    main(_cfg(tmp_path / "nhwc", **kw))
    main(_cfg(tmp_path / "nchw", channels_last=False, **kw))
    nhwc, nchw = _losses(tmp_path / "nhwc" / "run"), _losses(tmp_path / "nchw" / "run")
    assert len(nhwc) == 8
    torch.testing.assert_close(torch.tensor(nhwc), torch.tensor(nchw), rtol=1e-3, atol=0)
    weights = load_file(tmp_path / "nhwc" / "run" / "final" / "model.safetensors")
    assert all(t.is_contiguous() for t in weights.values())
    reference = load_file(tmp_path / "nchw" / "run" / "final" / "model.safetensors")
    assert weights.keys() == reference.keys()
    for k in weights:
        torch.testing.assert_close(weights[k], reference[k], rtol=1e-3, atol=1e-4)


def test_continuous_run_stores_latent_stats(tmp_path):
    main(_cfg(tmp_path, preset="kl-8x8", max_steps=5))
    model = ImageTokenizer.from_pretrained(tmp_path / "run" / "final")
    assert len(model.config.latent_mean) == model.config.latent_channels
    assert all(s > 0 for s in model.config.latent_std)


def test_raw_patches_need_no_training(tmp_path):
    metrics = main(_cfg(tmp_path, preset="patches-4", model={}))
    assert metrics["psnr"] > 90  # lossless up to float rounding


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_run_keeps_ranks_identical(tmp_path):
    run = tmp_path / "run"
    cmd = launch_cmd([
        "-m", "tokenizers_mm.train",
        "--preset", "vq-8x8", "--model", json.dumps({**TINY_MODEL, "vq_codebook_size": 64, "vq_dim": 4}),
        "--train_num", "256", "--eval_num", "16", "--batch_size", "16", "--max_steps", "8",
        "--warmup_steps", "1", "--log_every", "1", "--output_dir", str(run),
    ])  # fmt: skip
    proc = run_launch(cmd, cpu_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    digests = metrics["rank_param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_streaming_from_webdataset_shards(tmp_path):
    from data.build import build

    shards = tmp_path / "shards"
    build(
        dataset="shapes",
        num=96,
        resolution=32,
        format="webdataset",
        out=shards,
        seed=0,
        shard_size=32,
        progress=False,
    )
    metrics = main(
        _cfg(tmp_path, train_data=[str(shards)], in_memory=False, max_steps=6, batch_size=16, eval_num=16)
    )
    assert len(_losses(tmp_path / "run")) == 6
    assert metrics["psnr"] > 0


def test_sources_read_embedded_and_paths(tmp_path):
    from data.build import build
    from data.sources import images_tensor

    a, _ = images_tensor("shapes", num=8, resolution=32, seed=3)
    b, _ = images_tensor("shapes", num=8, resolution=32, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (8, 3, 32, 32) and torch.equal(a, b)
    build(dataset="digits", num=12, resolution=32, format="hf", out=tmp_path / "hf", seed=0, progress=False)
    c, skips = images_tensor(str(tmp_path / "hf"), num=100, resolution=32)
    assert c.shape == (12, 3, 32, 32) and skips.total == 0
    with pytest.raises(ValueError, match="num must be"):
        images_tensor("shapes", num=0, resolution=32)
