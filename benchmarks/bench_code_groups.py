"""Grouped image codes vs one code per position: training documents/s and generated images/s (issue 3).

    python benchmarks/bench_code_groups.py              # the shipped decoder dims, 1 thread
    python benchmarks/bench_code_groups.py --quick      # seconds, for CI

The same documents (the real shapes + digits caption mix with random 8×8 codes, as in
``bench_packing.py``: the cost does not depend on code values) are laid out two ways:

* ``g = 1``: 64 image tokens per document, the LM head over text + 1,000 codes; packed rows of 1,024
  tokens, 4 rows per step (``shapes_cpu.yaml`` before code groups);
* ``g = 2``: 16 image positions of 2×2 codes (``--model.code_group 2``), the LM head over text + the
  placeholder and the code-group head (4 slots); rows of 512 tokens, 3 rows per step, about the same
  documents per step.

Both decoders have the shipped trunk (hidden 192, 4 layers, 4 heads). Each repeat trains one epoch
(forward, backward, AdamW) of each layout alternately, in this one process; medians are reported. Then
each model generates ``--gen_batch`` images (CFG 3.0 linear, temperature 0.8: cond + uncond rows, KV
cache) alternately, timed the same way. Prints a table and one JSON line ``{"bench": "code_groups", ...}``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_common import emit_json
from bench_packing import NUM_IMAGE_CODES, caption_documents, packed_batches

from ar_model.config import MMDecoderConfig, vocab_layout
from ar_model.generation import generate_image_codes
from ar_model.modeling import MMDecoderForCausalLM

LAYOUTS = {1: (1024, 4), 2: (512, 3)}  # code_group -> (row length, rows per step)


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few documents, a small decoder (seconds, for CI)")
    p.add_argument("--docs", type=int, default=None, help="documents per epoch (default 1024, quick 96)")
    p.add_argument("--repeats", type=int, default=None, help="timed epochs per layout (default 3, quick 1)")
    p.add_argument("--gen_batch", type=int, default=None, help="images per generation call (default 32)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (the CPU trainer runs 1 per process)"
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    num_docs = args.docs or (96 if args.quick else 1024)
    repeats = args.repeats or (1 if args.quick else 3)
    gen_batch = args.gen_batch or (4 if args.quick else 32)
    dims = dict(hidden_size=32, num_layers=1, num_heads=2) if args.quick else {}
    dims = {"hidden_size": 192, "num_layers": 4, "num_heads": 4, **dims}

    setups = {}
    for g, (max_len, rows) in LAYOUTS.items():
        docs, tok = caption_documents(num_docs, code_group=g)
        torch.manual_seed(0)
        cfg = MMDecoderConfig(**vocab_layout(tok, NUM_IMAGE_CODES), **dims, code_group=g)
        model = MMDecoderForCausalLM(cfg).train()
        setups[g] = {
            "docs": docs,
            "tok": tok,
            "model": model,
            "opt": torch.optim.AdamW(model.parameters(), lr=1e-4),
            "batches": packed_batches(docs, max_len, rows, tok.pad_id),
        }

    def inputs(batch) -> dict:
        kw = {k: batch[k] for k in ("input_ids", "positions", "labels")}
        if "code_groups" in batch.tensors:
            kw["code_groups"] = batch["code_groups"]
        return {**kw, "doc_ids": batch.doc_ids, "seq_lens": batch.seq_lens}

    def epoch(g: int) -> float:
        s = setups[g]
        start = time.perf_counter()
        for batch in s["batches"]:
            s["model"](**inputs(batch)).loss.backward()
            s["opt"].step()
            s["opt"].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def generate(g: int) -> float:
        s = setups[g]
        tok = s["tok"]
        prompts = [torch.tensor([tok.bos_id, *tok.encode("two red circles above a blue star")])] * gen_batch
        start = time.perf_counter()
        generate_image_codes(
            s["model"], prompts, 8, 8, guidance_scale=3.0, cfg_schedule="linear", temperature=0.8,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        return time.perf_counter() - start

    for g in LAYOUTS:  # warm-up
        s = setups[g]
        s["model"](**inputs(s["batches"][0])).loss.backward()
        s["opt"].zero_grad(set_to_none=True)
    train_s: dict[int, list[float]] = {g: [] for g in LAYOUTS}
    gen_s: dict[int, list[float]] = {g: [] for g in LAYOUTS}
    for r in range(repeats):
        for g in (1, 2) if r % 2 == 0 else (2, 1):
            train_s[g].append(epoch(g))
    for g in LAYOUTS:
        setups[g]["model"].eval()
        generate(g)  # warm-up
    with torch.no_grad():
        for r in range(repeats):
            for g in (1, 2) if r % 2 == 0 else (2, 1):
                gen_s[g].append(generate(g))

    results: dict[str, object] = {
        "bench": "code_groups",
        "quick": args.quick,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "documents": num_docs,
        "image_codes": "random 8x8 (throughput does not depend on code values)",
        "model": dims,
        "generation": {"batch": gen_batch, "guidance_scale": 3.0, "cfg_schedule": "linear"},
    }
    for g in LAYOUTS:
        s = setups[g]
        tokens = sum(b["input_ids"].numel() for b in s["batches"])
        useful = sum(int((b.doc_ids >= 0).sum()) for b in s["batches"])
        seconds, gen = statistics.median(train_s[g]), statistics.median(gen_s[g])
        results[f"g{g}"] = {
            "code_group": g,
            "row_len": LAYOUTS[g][0],
            "rows_per_step": LAYOUTS[g][1],
            "steps": len(s["batches"]),
            "params": sum(q.numel() for q in s["model"].parameters()),
            "useful_tokens": useful,
            "useful_tokens_per_doc": round(useful / num_docs, 2),
            "padded_tokens": tokens,
            "epoch_s": round(seconds, 3),
            "docs_per_s": round(num_docs / seconds, 1),
            "useful_tokens_per_s": round(useful / seconds, 1),
            "gen_s": round(gen, 3),
            "images_per_s": round(gen_batch / gen, 2),
        }
    g1, g2 = results["g1"], results["g2"]
    results["train_docs_per_s_ratio"] = round(g2["docs_per_s"] / g1["docs_per_s"], 3)
    results["gen_images_per_s_ratio"] = round(g2["images_per_s"] / g1["images_per_s"], 3)

    head = f"{'layout':<8}{'params':>9}{'tok/doc':>9}{'steps':>7}{'epoch s':>9}{'docs/s':>9}"
    print(f"{head}{'tok/s':>9}{'img/s':>8}")
    for g in LAYOUTS:
        r = results[f"g{g}"]
        print(
            f"{'g=' + str(g):<8}{r['params']:>9}{r['useful_tokens_per_doc']:>9.1f}{r['steps']:>7}"
            f"{r['epoch_s']:>9.2f}{r['docs_per_s']:>9.1f}{r['useful_tokens_per_s']:>9.0f}{r['images_per_s']:>8.2f}"
        )
    print(
        f"g=2 / g=1: training documents/s {results['train_docs_per_s_ratio']:.2f}x, "
        f"generated images/s {results['gen_images_per_s_ratio']:.2f}x"
    )
    emit_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
