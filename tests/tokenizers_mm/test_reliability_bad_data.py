"""Bad data never stops training: a real Stage-1 run over ~10% bad samples finishes and reports them.

The data is 45 good samples plus ``data_helpers.awkward_records()``: corrupt, truncated and 0-byte
images, a decompression-bomb header and a record without an image (skipped), and modes L, RGBA, P,
I;16 and CMYK and a Latin-1 caption (converted or repaired): 5 of 56 samples are skipped. It is read
from webdataset shards and from an HF ``save_to_disk`` folder, in memory and streamed.
"""

from __future__ import annotations

import logging
import re

import datasets
import pytest
from data_helpers import awkward_records, good_records, write_tar

from tokenizers_mm.train import TrainConfig, main

TINY = {"base_channels": 8, "channel_mult": [1, 2, 2], "mid_blocks": 0, "norm_groups": 4}
BAD_KEYS = {"bad-corrupt", "bad-truncated", "bad-empty", "bad-huge", "bad-noimage"}


def _records():
    bad, skipped, _ = awkward_records()
    assert set(skipped) == BAD_KEYS
    return good_records(45) + bad


def _webdataset(root):
    records = _records()
    root.mkdir()
    write_tar(root / "shard-000000.tar", records[::2])
    write_tar(root / "shard-000001.tar", records[1::2])
    return root


def _hf(root):
    rows = {"image": [], "text": []}
    for _key, files in _records():
        image = files.get("png", files.get("jpg"))
        rows["image"].append(None if image is None else {"bytes": image, "path": None})
        rows["text"].append(files["txt"])
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("binary")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(root))
    return root


def _cfg(tmp_path, data, **kw):
    base = dict(
        preset="fsq-8x8",
        model=TINY,
        train_data=[str(data)],
        train_num=1000,
        eval_num=16,
        batch_size=16,
        max_steps=3,
        warmup_steps=1,
        log_every=1,
        save_every=0,
        output_dir=str(tmp_path / "run"),
    )
    return TrainConfig(**{**base, **kw})


def _skip_lines(text: str) -> list[tuple[int, set[str]]]:
    """(count, skipped keys) of each summary line like ``skipped 5 samples ...: corrupt=1 (keys: a), ...``."""
    found = []
    for m in re.finditer(r"skipped (\d+) samples[^\n]*", text):
        skips = m.group(0).split("; repaired")[0]  # the repaired samples are listed after the skipped
        groups = re.findall(r"\(keys: ([^)]*)\)", skips)
        found.append((int(m.group(1)), {k.strip() for g in groups for k in g.split(",")}))
    return found


@pytest.mark.parametrize("fmt", ["webdataset", "hf"])
def test_in_memory_run_skips_and_counts_bad_samples(tmp_path, capsys, fmt):
    data = (_webdataset if fmt == "webdataset" else _hf)(tmp_path / fmt)
    metrics = main(_cfg(tmp_path, data))
    assert metrics["steps"] == 3 and metrics["psnr"] > 0
    out = capsys.readouterr().out
    assert f"{data}: skipped 5 unreadable samples" in out
    # An HF dataset without a key column names its samples by row index.
    rows = {f"{i:09d}" for i, (key, _) in enumerate(_records()) if key in BAD_KEYS}
    assert _skip_lines(out) == [(5, BAD_KEYS if fmt == "webdataset" else rows)]


def test_streamed_run_reports_the_skips_of_every_epoch(tmp_path, caplog):
    data = _webdataset(tmp_path / "wds")
    caplog.set_level(logging.WARNING, logger="data")
    # 51 readable samples make 3 batches of 16 per epoch: 7 steps start a third epoch, so the
    # first two epochs have been read to their end and summarized.
    main(_cfg(tmp_path, data, in_memory=False, max_steps=7))
    summaries = [
        r.getMessage() for r in caplog.records if re.match(r"skipped \d+ samples in epoch", r.getMessage())
    ]
    assert [s.split(":")[0] for s in summaries] == [
        "skipped 5 samples in epoch 0",
        "skipped 5 samples in epoch 1",
    ]
    assert all(keys == BAD_KEYS for _, keys in _skip_lines("\n".join(summaries)))
