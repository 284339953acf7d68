"""Packed rows vs one document per row (and packed rows joined without padding): useful-token fraction and
useful tokens/s of training (issue 3).

    python benchmarks/bench_packing.py                # 512 documents, the decoder of bench_decoder_train
    python benchmarks/bench_packing.py --threads 1    # as the CPU trainer runs (1 thread/process)
    python benchmarks/bench_packing.py --quick        # seconds, for CI

Documents are the real Stage-2 mix: captions from ``data.shapes.generate_shapes`` and
``data.digits.generate_digits`` (half each), a SentencePiece tokenizer trained on them with
``ar_model.train_text_tokenizer``, and an 8×8 grid of image codes per caption. The codes are
**random** (uniform over the codebook): attention, matmuls and packing cost the same for any code
values, so throughput does not depend on them. Orders and caption drops follow the shipped
``ar_model/configs/shapes_cpu.yaml`` (85% caption→image, 15% image→caption, 10% of captions dropped),
built with ``ar_model.sequence.build_sequence``.

Both layouts train on every document once per "epoch", with about the same tokens per step:

* packed: ``pack_documents`` (best-fit decreasing) into rows of ``--max-len``, ``--rows`` rows per
  step (``build_packed_batch``), attention within documents (``sdpa_per_doc``); the defaults are the
  shipped config's 1024-token rows and 4096 tokens per batch;
* padded: ``--rows * --max-len // longest document`` documents per step, each in its own row padded
  to the longest of its batch (``build_padded_batch``);
* joined: the packed batches with their rows joined into one row without the padding at each row's end
  (``join_rows``, what ``ar_model.train`` does by default with per-document attention).

Useful tokens are the documents' own tokens (padding excluded). Each repeat times one epoch of each
layout, alternately; medians are reported. Prints a table and one JSON line ``{"bench": "packing", ...}``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from bench_common import emit_json

from ar_model.code_groups import group_codes
from ar_model.config import MMDecoderConfig, vocab_layout
from ar_model.modeling import MMDecoderForCausalLM
from ar_model.packing import TokenBatch, build_packed_batch, build_padded_batch, join_rows, pack_documents
from ar_model.presets import PRESETS
from ar_model.sequence import build_sequence, image_to_text_document, text_to_image_document
from ar_model.text_tokenizer import TextTokenizer, train_text_tokenizer
from data.digits import generate_digits
from data.shapes import generate_shapes

CODE_GRID = (8, 8)  # image tokens per document: an 8x8 tokenizer grid (32 px images, factor 4)
NUM_IMAGE_CODES = 1000  # FSQ levels [8, 5, 5, 5]
T2I_FRACTION, CAPTION_DROP = 0.85, 0.1  # as ar_model/configs/shapes_cpu.yaml


def caption_documents(
    num_docs: int,
    scheme: str = "rope_tv",
    *,
    text_vocab_size: int = 600,
    t2i_fraction: float = T2I_FRACTION,
    caption_drop: float = CAPTION_DROP,
    seed: int = 0,
    code_group: int = 1,
) -> tuple[list[dict[str, torch.Tensor]], TextTokenizer]:
    """``num_docs`` documents (per-token ``input_ids``, ``positions``, ``labels``, ...) and their tokenizer.

    Half the captions come from the shapes generator, half from the digits generator, interleaved;
    each gets an 8×8 grid of random codes. ``code_group = g > 1`` lays the same codes out as
    ``g × g`` groups per position (``ar_model.code_groups``; the placeholder id is the first id after
    the text vocabulary, as in training); the documents are otherwise the same.
    """
    captions = [s.caption for s in generate_shapes((num_docs + 1) // 2, seed=seed)]
    captions += [s.caption for s in generate_digits(num_docs // 2, seed=seed)]
    rng = random.Random(seed)
    rng.shuffle(captions)
    tok = train_text_tokenizer(captions, None, vocab_size=text_vocab_size, max_image_side=16)
    g = torch.Generator().manual_seed(seed)
    docs = []
    for caption in captions:
        codes = torch.randint(0, NUM_IMAGE_CODES, CODE_GRID, generator=g)  # random codes, see the docstring
        if code_group > 1:
            codes = group_codes(codes, code_group)  # (8, 8) -> (8/g, 8/g, g*g)
        if rng.random() < t2i_fraction:
            segments = text_to_image_document(caption, codes)
            drop = rng.random() < caption_drop
        else:
            segments, drop = image_to_text_document(codes, caption), False
        image_id = tok.vocab_size if code_group > 1 else None
        seq = build_sequence(segments, tok, scheme=scheme, drop_caption=drop, image_token_id=image_id)
        docs.append(seq.as_document())
    return docs, tok


def preset_dims(preset: str) -> dict[str, int]:
    """The trunk dimensions of an ``ar_model`` preset, untied (as ``LlamaForCausalLM``'s default)."""
    return {k: v for k, v in PRESETS[preset].items() if k != "tie_embeddings"}


def decoder_config(
    tok: TextTokenizer, scheme: str, quick: bool, preset: str | None = None, **overrides
) -> MMDecoderConfig:
    """The decoder of the training benchmark: hidden 256, 4 layers, 4 heads, SwiGLU 1024, vocab 4096.

    ``preset`` (a name of ``ar_model.presets.PRESETS``, e.g. ``base`` on a GPU) takes that preset's
    dimensions instead; the vocabulary stays 4096.
    """
    dims = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, vocab_size=4096)
    if preset is not None:
        dims = dict(preset_dims(preset), vocab_size=4096)
    elif quick:
        dims.update(hidden_size=64, num_layers=2, intermediate_size=128)
    return MMDecoderConfig(**vocab_layout(tok, NUM_IMAGE_CODES), **dims, rope_scheme=scheme, **overrides)


def model_inputs(batch: TokenBatch, packed: bool) -> dict:
    """Keyword arguments of the decoder for one batch (documents are passed for packed rows only)."""
    inputs = {"input_ids": batch["input_ids"], "positions": batch["positions"], "labels": batch["labels"]}
    if packed:
        inputs.update(doc_ids=batch.doc_ids, seq_lens=batch.seq_lens)
    else:  # one document per row, padding at the end: causal attention over the row is exact
        inputs.update(seq_lens=batch.seq_lens)
    return inputs


def packed_batches(docs: list[dict], max_len: int, rows: int, pad_id: int) -> list[TokenBatch]:
    """The epoch as packed batches of ``rows`` rows."""
    plan = pack_documents([d["input_ids"].shape[0] for d in docs], max_len)
    out = []
    for start in range(0, plan.num_rows, rows):
        sub = type(plan)(rows=plan.rows[start : start + rows], max_len=max_len, lengths=plan.lengths)
        out.append(build_packed_batch(docs, sub, pad_id=pad_id))
    return out


def padded_batches(docs: list[dict], tokens_per_step: int, pad_id: int) -> list[TokenBatch]:
    """The epoch as one-document-per-row batches with about ``tokens_per_step`` tokens each."""
    longest = max(d["input_ids"].shape[0] for d in docs)
    per_step = max(1, tokens_per_step // longest)
    return [build_padded_batch(docs[i : i + per_step], pad_id=pad_id) for i in range(0, len(docs), per_step)]


def _stats(batches: list[TokenBatch]) -> dict[str, float]:
    total = sum(b["input_ids"].numel() for b in batches)
    useful = sum(int((b.doc_ids >= 0).sum()) for b in batches)
    return {
        "steps": len(batches),
        "tokens": total,
        "useful_tokens": useful,
        "useful_fraction": useful / total,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few documents, a small decoder (seconds, for CI)")
    p.add_argument("--docs", type=int, default=None, help="documents per epoch (default 512, quick 128)")
    p.add_argument("--max-len", type=int, default=1024, help="packed row length")
    p.add_argument("--rows", type=int, default=4, help="packed rows per training step")
    p.add_argument("--scheme", default="rope_tv", choices=["rope_tv", "mrope", "flat"])
    p.add_argument("--repeats", type=int, default=None, help="timed epochs per layout (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    num_docs = args.docs or (128 if args.quick else 512)
    max_len = args.max_len
    rows = args.rows
    repeats = args.repeats or (1 if args.quick else 3)

    docs, tok = caption_documents(num_docs, args.scheme)
    torch.manual_seed(0)
    model = MMDecoderForCausalLM(decoder_config(tok, args.scheme, args.quick)).train()
    packed = packed_batches(docs, max_len, rows, tok.pad_id)
    limit = max(model.config.max_position, rows * max_len)
    layouts = {
        "packed": packed,
        "padded": padded_batches(docs, rows * max_len, tok.pad_id),
        "joined": [join_rows(b, limit, tok.pad_id) for b in packed],
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def epoch(name: str) -> float:
        start = time.perf_counter()
        for batch in layouts[name]:
            model(**model_inputs(batch, name != "padded")).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    model(**model_inputs(layouts["packed"][0], True)).loss.backward()  # warm-up, both layouts
    model(**model_inputs(layouts["padded"][0], False)).loss.backward()
    model(**model_inputs(layouts["joined"][0], True)).loss.backward()
    optimizer.zero_grad(set_to_none=True)
    times: dict[str, list[float]] = {name: [] for name in layouts}
    order = ["packed", "padded", "joined"]
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(epoch(name))

    lengths = [d["input_ids"].shape[0] for d in docs]
    results: dict[str, object] = {
        "bench": "packing",
        "quick": args.quick,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "scheme": args.scheme,
        "documents": num_docs,
        "doc_len_min": min(lengths),
        "doc_len_mean": round(sum(lengths) / len(lengths), 2),
        "doc_len_max": max(lengths),
        "max_len": max_len,
        "rows_per_step": rows,
        "image_codes": "random (throughput does not depend on code values)",
        "model": {
            k: getattr(model.config, k) for k in ("hidden_size", "num_layers", "num_heads", "vocab_size")
        },
    }
    for name, batches in layouts.items():
        stats, seconds = _stats(batches), statistics.median(times[name])
        results[name] = {
            **stats,
            "useful_fraction": round(stats["useful_fraction"], 4),
            "epoch_s": round(seconds, 4),
            "tokens_per_s": round(stats["tokens"] / seconds, 1),
            "useful_tokens_per_s": round(stats["useful_tokens"] / seconds, 1),
        }
    results["useful_tokens_per_s_speedup"] = round(
        results["packed"]["useful_tokens_per_s"] / results["padded"]["useful_tokens_per_s"], 3
    )
    results["joined_vs_packed_speedup"] = round(
        results["joined"]["useful_tokens_per_s"] / results["packed"]["useful_tokens_per_s"], 3
    )

    header = f"{'layout':<8}{'steps':>7}{'tokens':>9}{'useful':>9}{'fraction':>10}{'epoch s':>9}"
    print(f"{header}{'useful tok/s':>14}")
    for name in layouts:
        r = results[name]
        print(
            f"{name:<8}{r['steps']:>7}{r['tokens']:>9}{r['useful_tokens']:>9}{r['useful_fraction']:>10.3f}"
            f"{r['epoch_s']:>9.2f}{r['useful_tokens_per_s']:>14.0f}"
        )
    print(f"packed / padded useful tokens/s: {results['useful_tokens_per_s_speedup']:.2f}x")
    print(f"joined / packed useful tokens/s: {results['joined_vs_packed_speedup']:.3f}x")
    emit_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
