"""Training documents: epochs, packing, rank sharding and caption handling (ar_model.documents)."""

from __future__ import annotations

import pytest
import torch

from ar_model.documents import (
    DOC_OVERHEAD,
    I2T,
    T2I,
    CodesCorpus,
    DocSpec,
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
        targets = ids[1:].clone()
        if spec.drop_caption:  # an unconditional document's <eos> is not a target (see below)
            targets[-1] = IGNORE_INDEX
        assert torch.equal(doc["labels"][:-1], targets)
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


# ----------------------------------------------------------------------------- continuous latents
def _latent_corpus(text_tokenizer, captions, n=120, grid=(4, 4), dim=3):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, *grid, dim, generator=g)  # (n, h, w, D), as if normalized
    return CodesCorpus(latents, [captions[i % len(captions)] for i in range(n)], text_tokenizer, 256)


def test_packed_latents_unpack_to_each_documents_own(text_tokenizer, captions):
    corpus = _latent_corpus(text_tokenizer, captions)
    assert corpus.latent_dim == 3
    batches = _batches(corpus)
    batch = batches.get(0)
    rows, max_len = batch["input_ids"].shape
    assert batch["latents"].shape == (rows, max_len, 3) and batch["latent_mask"].dtype == torch.bool
    pad = batch.doc_ids < 0  # (rows, max_len)
    assert pad.any() and not batch["latent_mask"][pad].any() and (batch["latents"][pad] == 0).all()
    # the placeholder id marks exactly the latent positions, and no label asks for it
    assert torch.equal(batch["latent_mask"], batch["input_ids"] == CODE_OFFSET)
    assert not (batch["labels"] == CODE_OFFSET).any()
    specs = [spec for row in batches.specs(0) for spec in row]
    docs = unpack_batch(batch)
    assert len(docs) == len(specs) > 4
    for i, spec in enumerate(specs):
        doc = docs[i]
        mask = doc["latent_mask"]
        assert torch.equal(doc["latents"][mask], corpus.codes[spec.sample].reshape(16, 3))  # raster order
        assert (doc["latents"][~mask] == 0).all()
        first = int(mask.nonzero()[0])
        caption = 0 if spec.drop_caption else len(corpus.caption_ids[spec.sample])
        assert first == (4 if spec.task == I2T else 4 + caption)


def test_text_only_documents_pack_beside_latent_documents(text_tokenizer, captions):
    from ar_model.documents import with_latents
    from ar_model.packing import build_packed_batch, pack_documents
    from ar_model.sequence import build_sequence

    corpus = _latent_corpus(text_tokenizer, captions, n=2)
    image_doc = corpus.document(plan_epoch(2, 0, 0, 1.0, 0.0)[0], "rope_tv", CODE_OFFSET)
    text_doc = build_sequence([("text", "a red circle")], text_tokenizer).as_document()
    text_doc["task"] = torch.full((text_doc["input_ids"].shape[0],), T2I)
    docs = with_latents([text_doc, image_doc], 3)
    assert list(docs[0]) == list(docs[1])  # same keys, same order: they pack together
    assert (docs[0]["latents"] == 0).all() and not docs[0]["latent_mask"].any()
    assert all(torch.equal(docs[1][k], image_doc[k]) for k in image_doc)  # an image document is kept
    lengths = [d["input_ids"].shape[0] for d in docs]
    back = unpack_batch(build_packed_batch(docs, pack_documents(lengths, 128)))
    for i in range(2):
        for key in docs[i]:
            assert torch.equal(back[i][key], docs[i][key]), key
    with pytest.raises(ValueError, match="expected 5"):
        with_latents([image_doc], 5)


def test_eval_batches_carry_latents_and_bad_latents_are_refused(text_tokenizer, captions):
    corpus = _latent_corpus(text_tokenizer, captions, n=8)
    batches = eval_batches(corpus, 256, 1024, "rope_tv", CODE_OFFSET, 0)
    assert sum(int(b["latent_mask"].sum()) for b in batches) == 2 * 8 * 16  # each image in both orders
    bad = torch.zeros(2, 4, 4, 3)
    bad[1, 2, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        CodesCorpus(bad, ["a", "b"], text_tokenizer, 128)
    with pytest.raises(ValueError, match="float tensor"):
        CodesCorpus(torch.zeros(2, 4, 4, 3, 1, dtype=torch.long), ["a", "b"], text_tokenizer, 128)


def test_grouped_corpus_documents_carry_code_groups(text_tokenizer, captions):
    codes = torch.randint(0, 16, (4, 4, 4, 4), generator=torch.Generator().manual_seed(0))  # (N, h, w, G)
    corpus = CodesCorpus(codes, captions[:4], text_tokenizer, 128)
    assert corpus.grouped and corpus.latent_dim == 0 and corpus.grid == (4, 4)
    for task in (T2I, I2T):
        spec = DocSpec(sample=2, task=task, drop_caption=False)
        doc = corpus.document(spec, "rope_tv", CODE_OFFSET)
        at = doc["input_ids"] == CODE_OFFSET  # the placeholder
        assert doc["input_ids"].shape[0] == corpus.length(spec) and int(at.sum()) == 16
        assert torch.equal(doc["code_groups"][at], codes[2].reshape(16, 4))


def test_no_document_teaches_an_empty_caption_after_an_image(text_tokenizer, captions):
    """A caption-dropped text-to-image document reads ``<bos> <boi> <h> <w> codes <eoi> <eos>``, exactly as an
    image-to-text document does up to ``<eoi>``. Its ``<eos>`` must not be a target, or the model learns
    that a caption may be empty and greedy captioning stops at once; every other label is kept."""
    corpus = _corpus(text_tokenizer, captions)
    specs = plan_epoch(len(corpus), 0, 0, t2i_fraction=0.5, caption_drop=0.5)
    assert {(s.task, s.drop_caption) for s in specs} == {(T2I, True), (T2I, False), (I2T, False)}
    eos, eoi = text_tokenizer.eos_id, text_tokenizer.eoi_id
    for spec in specs:
        doc = corpus.document(spec, "rope_tv", CODE_OFFSET)
        ids, labels = doc["input_ids"], doc["labels"]
        at_eoi = int((ids == eoi).nonzero()[0])
        image_first = (doc["modality"][:at_eoi] == 0).sum() == 4  # <bos> <boi> <h> <w> before the codes
        if image_first:
            assert labels[at_eoi] != eos, spec  # after an unconditioned image comes a caption
        else:
            assert labels[at_eoi] == eos  # a captioned text-to-image document still ends
        ignored = (labels == IGNORE_INDEX).nonzero().flatten().tolist()
        assert ignored == ([at_eoi] if spec.drop_caption else []) + [len(ids) - 1]
