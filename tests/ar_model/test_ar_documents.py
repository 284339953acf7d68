"""Training documents: epochs, packing, rank sharding and caption handling (ar_model.documents)."""

from __future__ import annotations

import pytest
import torch

from ar_model.documents import (
    DOC_OVERHEAD,
    I2T,
    T2I,
    CodesCorpus,
    PackedBatches,
    eval_batches,
    plan_epoch,
)
from ar_model.packing import IGNORE_INDEX, unpack_batch

CODE_OFFSET = 400


def _corpus(text_tokenizer, captions, n=120, max_len=256, grid=(4, 4)):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 50, (n, *grid), generator=g)
    return CodesCorpus(codes, [captions[i % len(captions)] for i in range(n)], text_tokenizer, max_len)


def _batches(corpus, rank=0, world=1, **kw):
    args = dict(max_len=256, tokens_per_batch=1024, scheme="rope_tv", code_offset=CODE_OFFSET, pad_id=0)
    return PackedBatches(corpus, rank=rank, world=world, **{**args, **kw})


def test_plan_epoch_is_seeded_and_respects_the_fractions():
    a = plan_epoch(4000, epoch=3, seed=1, t2i_fraction=0.75, caption_drop=0.1)
    assert a == plan_epoch(4000, epoch=3, seed=1, t2i_fraction=0.75, caption_drop=0.1)
    assert a != plan_epoch(4000, epoch=4, seed=1, t2i_fraction=0.75, caption_drop=0.1)
    assert sorted(s.sample for s in a) == list(range(4000))
    t2i = [s for s in a if s.task == T2I]
    assert 0.72 < len(t2i) / 4000 < 0.78
    assert 0.07 < sum(s.drop_caption for s in t2i) / len(t2i) < 0.13
    assert not any(s.drop_caption for s in a if s.task == I2T)  # only captions used as conditions drop


def test_ranks_split_an_epoch_without_overlap(text_tokenizer, captions):
    corpus = _corpus(text_tokenizer, captions)
    ranks = [_batches(corpus, rank=r, world=2) for r in range(2)]
    per_epoch = ranks[0].batches_per_epoch
    assert per_epoch == ranks[1].batches_per_epoch >= 1
    seen = [
        (spec.sample, spec.task)
        for r in ranks
        for m in range(per_epoch)
        for row in r.specs(m)
        for spec in row
    ]
    assert len(seen) == len(set(seen))  # no document twice in an epoch
    # the next epoch reshuffles
    assert ranks[0].specs(per_epoch) != ranks[0].specs(0)


def test_batches_are_a_pure_function_of_the_step(text_tokenizer, captions):
    corpus = _corpus(text_tokenizer, captions)
    a, b = _batches(corpus), _batches(corpus)
    a.get(5)  # moves a to another epoch first
    for m in (0, 1, a.batches_per_epoch + 1):
        x, y = a.get(m), b.get(m)
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["positions"], y["positions"])


def test_packed_rows_hold_whole_documents_with_their_own_labels(text_tokenizer, captions):
    corpus = _corpus(text_tokenizer, captions)
    batch = _batches(corpus).get(0)
    rows, max_len = batch["input_ids"].shape
    assert rows == 1024 // 256 and max_len == 256
    assert batch.useful_fraction > 0.85
    specs = [spec for row in _batches(corpus).specs(0) for spec in row]
    docs = unpack_batch(batch)
    assert len(docs) == len(specs)
    h, w = corpus.grid
    for i, spec in enumerate(specs):
        doc = docs[i]
        ids = doc["input_ids"]
        assert len(ids) == corpus.length(spec)
        assert doc["labels"][-1] == IGNORE_INDEX  # nothing is predicted across a boundary
        assert torch.equal(doc["labels"][:-1], ids[1:])
        codes = ids[doc["modality"] == 1] - CODE_OFFSET
        assert torch.equal(codes.view(h, w), corpus.codes[spec.sample])
        text = ids[doc["modality"] == 0]
        caption = text_tokenizer.decode(text.tolist())
        assert caption == ("" if spec.drop_caption else corpus.texts[spec.sample])
        assert (doc["task"] == spec.task).all()
        assert ids[0] == text_tokenizer.bos_id and ids[-1] == text_tokenizer.eos_id
        # caption first for text-to-image, image first for image-to-text
        first_image = int((doc["modality"] == 1).nonzero()[0])
        assert (first_image == 4) == (spec.task == I2T or spec.drop_caption)


def test_long_captions_are_truncated_with_a_warning(text_tokenizer):
    long = " ".join(["red circle"] * 100)
    codes = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.warns(UserWarning, match="truncated"):
        corpus = CodesCorpus(codes, [long, "a red circle"], text_tokenizer, max_len=40)
    assert corpus.num_truncated == 1
    assert all(corpus.length(plan) <= 40 for plan in plan_epoch(2, 0, 0, 1.0, 0.0))


def test_empty_captions_and_unknown_characters_are_fine(text_tokenizer):
    codes = torch.zeros(2, 4, 4, dtype=torch.long)
    corpus = CodesCorpus(codes, ["", "ein grünes Quadrat 🟩"], text_tokenizer, max_len=128)
    batches = eval_batches(corpus, 128, 256, "rope_tv", CODE_OFFSET, 0)
    assert sum(len(b.seq_lens[r]) for b in batches for r in range(b.num_rows)) == 4
    assert corpus.length(plan_epoch(2, 0, 0, 1.0, 0.0)[0]) >= 16 + DOC_OVERHEAD


def test_an_image_grid_that_cannot_fit_is_an_error_at_build_time(text_tokenizer):
    with pytest.raises(ValueError, match="raise max_len"):
        CodesCorpus(torch.zeros(1, 8, 8, dtype=torch.long), ["x"], text_tokenizer, max_len=64)


def test_an_epoch_with_fewer_batches_than_the_first_does_not_crash(text_tokenizer, captions):
    batches = _batches(_corpus(text_tokenizer, captions), rank=1, world=2)
    per_epoch = batches.batches_per_epoch
    batches._load_epoch(1)
    batches._batches = batches._batches[: 2 * per_epoch - 1]  # as if epoch 1 packed one batch fewer
    assert batches.get(2 * per_epoch - 1)["input_ids"].shape[1] == 256  # the epoch's last step
