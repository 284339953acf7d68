"""Tests for data.skips.SkipCounter."""

from __future__ import annotations

import logging

from data.skips import SkipCounter


def test_counts_keys_and_summary():
    counter = SkipCounter(max_keys=2)
    for key in ("a", "b", "c"):
        counter.skip(key, "corrupt")
    counter.skip("d", "mode")
    counter.repair("e", "caption_utf8")
    assert counter.total == 4
    assert counter.total_repaired == 1
    assert counter.as_dict() == {"skipped": {"corrupt": 3, "mode": 1}, "repaired": {"caption_utf8": 1}}
    line = counter.summary(epoch=0)
    assert line.startswith("skipped 4 samples in epoch 0: corrupt=3 (keys: a, b, ...), mode=1 (keys: d)")
    assert "repaired 1: caption_utf8=1 (keys: e)" in line


def test_log_summary_is_one_warning_per_call(caplog):
    counter = SkipCounter(max_warnings=2)
    with caplog.at_level(logging.WARNING, logger="data"):
        for i in range(5):
            counter.skip(f"k{i}", "empty")
    per_skip = [r for r in caplog.records if "skipping sample" in r.getMessage()]
    assert len(per_skip) == 2  # rate-limited
    assert "'k0'" in per_skip[0].getMessage()
    caplog.clear()
    logger = logging.getLogger("data.test")
    with caplog.at_level(logging.WARNING):
        counter.log_summary(logger, epoch=3)
    assert [r.getMessage() for r in caplog.records] == [
        "skipped 5 samples in epoch 3: empty=5 (keys: k0, k1, k2, k3, k4)"
    ]


def test_nothing_to_report_logs_nothing(caplog):
    with caplog.at_level(logging.WARNING):
        SkipCounter().log_summary(epoch=0)
    assert caplog.records == []


def test_merge_and_reset():
    a, b = SkipCounter(), SkipCounter()
    a.skip("x", "corrupt")
    b.skip("y", "corrupt")
    b.repair("z", "missing_caption")
    a.merge(b)
    assert a.skipped["corrupt"] == 2 and a.skipped_keys["corrupt"] == ["x", "y"]
    assert a.repaired["missing_caption"] == 1
    a.reset()
    assert a.total == 0 and a.summary() == "skipped 0 samples"
