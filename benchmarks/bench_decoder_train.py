"""Decoder training throughput against transformers' ``LlamaForCausalLM``, side by side (issue 3, issue 6).

    python benchmarks/bench_decoder_train.py                 # batch 8 x 512, hidden 256, 4 layers
    python benchmarks/bench_decoder_train.py --threads 1     # as the CPU trainer runs (1 thread/process)
    python benchmarks/bench_decoder_train.py --quick         # seconds, for CI
    python benchmarks/bench_decoder_train.py --preset base --seq-len 2048 --attn-impl flex  # GPU, 103M

One training step = forward, backward and ``AdamW.step`` (the same optimizer settings for every
model). The models have the same dimensions (hidden 256, 4 layers, 4 heads, SwiGLU 1024, vocabulary
4096, untied embeddings, no QK-norm: Llama has none) and the same initial weights (ours are copied into
the Llama; the parameter names match). Inputs are 8 rows of 512 tokens packed from real caption
documents (see ``bench_packing.caption_documents``: shapes and digits captions, 8x8 random image codes).

Contenders, each timed alternately with the others after a warm-up (medians of ``--repeats``):

* ``hf``: ``LlamaForCausalLM`` (SDPA attention) on the packed rows as plain causal rows with 1-D
  positions: it attends across document boundaries, the cheapest thing it can do with packed rows;
* ``ours_rope_tv``: our decoder as it trains, with ``rope_tv`` 2-D positions and attention within
  documents (``sdpa_per_doc``);
* ``ours_flat``: the same with ``flat`` (1-D) positions;
* ``ours_flat_causal``: the same computation as ``hf`` (1-D positions, causal rows, no documents):
  the implementation alone. Its loss is checked against ``hf``'s (same labels);
* with ``--compile``, also ``ours_flat_causal_compiled``: the same with each decoder layer wrapped in
  ``torch.compile`` (``hf`` stays eager; the compile time is reported, not timed). Not the default: on
  2 CPU cores compiling takes 15-60 s for a few percent.

``speedup`` = hf step time / ours (> 1: ours is faster). fp32 on CPU, bf16 weights on CUDA
(``--dtype``). Prints a table and one JSON line ``{"bench": "decoder_train", ...}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import emit_json  # noqa: E402
from bench_packing import caption_documents, decoder_config, packed_batches  # noqa: E402

from ar_model.modeling import MMDecoderForCausalLM  # noqa: E402
from ar_model.packing import IGNORE_INDEX  # noqa: E402


def llama_twin(model: MMDecoderForCausalLM) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with ``model``'s dimensions and weights (flat RoPE, no QK-norm)."""
    c = model.config
    if c.qk_norm:
        raise ValueError("Llama has no QK-norm: build the decoder with qk_norm=False")
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads,
            num_key_value_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            rms_norm_eps=c.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
            max_position_embeddings=c.max_position,
            tie_word_embeddings=c.tie_embeddings,
            attn_implementation="sdpa",
        )
    )
    llama.load_state_dict(model.state_dict(), strict=True)
    return llama.to(device=model.device, dtype=model.dtype)


def time_interleaved(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int, sync
) -> dict[str, float]:
    """Median seconds per call of each function; every repeat calls each once, in a rotating order."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step(model: torch.nn.Module, inputs: dict, optimizer: torch.optim.Optimizer) -> Callable[[], float]:
    def step() -> float:
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="small model and batch, few repeats (seconds, for CI)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="default: fp32 CPU, bf16 CUDA"
    )
    p.add_argument("--batch", type=int, default=8, help="rows per step (quick: 2)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row (quick: 256)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per model (default 9, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model (default 2, quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="also time ours_flat_causal with compiled layers")
    p.add_argument("--preset", default=None, help="dimensions of an ar_model preset (base: GPU)")
    p.add_argument(
        "--attn-impl",
        default="sdpa_per_doc",
        choices=["sdpa_per_doc", "sdpa_dense_mask", "flex"],
        help="packed attention of ours_rope_tv / ours_flat (flex: GPU)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch = 2 if args.quick and args.batch == 8 else args.batch
    seq_len = 256 if args.quick and args.seq_len == 512 else args.seq_len
    repeats = args.repeats or (2 if args.quick else 9)
    warmup = args.warmup or (1 if args.quick else 2)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    # Real packed rows: enough documents for `batch` full rows (an 8x8 image document has ~75-85 tokens).
    rows = {}
    for scheme in ("rope_tv", "flat"):
        docs, tok = caption_documents(batch * seq_len // 60, scheme)
        rows[scheme] = packed_batches(docs, seq_len, batch, tok.pad_id)[0]
    packed = rows["rope_tv"]
    assert packed["input_ids"].shape == (batch, seq_len) and torch.equal(
        packed["input_ids"], rows["flat"]["input_ids"]
    )

    def to_dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device)

    ids, labels = to_dev(packed["input_ids"]), to_dev(packed["labels"])
    # transformers shifts labels inside: give it ours shifted right, so both predict the same targets.
    hf_labels = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels[:, :-1]], dim=1)
    models, inputs = {}, {}
    ours = [("ours_rope_tv", "rope_tv"), ("ours_flat", "flat"), ("ours_flat_causal", "flat")]
    if args.compile:
        ours.append(("ours_flat_causal_compiled", "flat"))
    for name, scheme in ours:
        torch.manual_seed(0)  # the same initial weights for every contender
        cfg = decoder_config(
            tok, scheme, args.quick, args.preset, qk_norm=False, max_position=max(4096, seq_len),
            attn_impl=args.attn_impl,
        )  # fmt: skip
        models[name] = MMDecoderForCausalLM(cfg).to(device=device, dtype=dtype).train()
        b = rows[scheme]
        inputs[name] = {"input_ids": ids, "positions": to_dev(b["positions"]), "labels": labels}
        if not name.startswith("ours_flat_causal"):
            inputs[name].update(doc_ids=to_dev(b.doc_ids), seq_lens=b.seq_lens)
    models["hf"] = llama_twin(models["ours_flat_causal"]).train()
    inputs["hf"] = {"input_ids": ids, "labels": hf_labels}
    names = ["hf", *(name for name, _ in ours)]
    steps = {
        name: train_step(models[name], inputs[name], torch.optim.AdamW(models[name].parameters(), lr=1e-4))
        for name in names
    }
    compile_s = None
    if args.compile:
        for layer in models["ours_flat_causal_compiled"].model.layers:
            layer.compile()
        start = time.perf_counter()
        steps["ours_flat_causal_compiled"]()  # compiles forward and backward
        compile_s = round(time.perf_counter() - start, 1)

    with torch.no_grad():  # same computation, same loss: ours_flat_causal is Llama
        loss_ours = models["ours_flat_causal"](**inputs["ours_flat_causal"]).loss.item()
        loss_hf = models["hf"](**inputs["hf"]).loss.item()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert abs(loss_ours - loss_hf) <= tol * max(1.0, abs(loss_hf)), (loss_ours, loss_hf)

    seconds = time_interleaved(steps, warmup, repeats, sync)
    tokens = batch * seq_len
    useful = int((packed.doc_ids >= 0).sum())
    results: dict[str, object] = {
        "bench": "decoder_train",
        "quick": args.quick,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch": batch,
        "seq_len": seq_len,
        "model": {
            k: getattr(models["hf"].config, k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "vocab_size",
            )
        },
        "preset": args.preset,
        "attn_impl": args.attn_impl,
        "docs_per_row": round(sum(len(s) for s in packed.seq_lens) / batch, 2),
        "useful_fraction": round(useful / tokens, 4),
        "loss_ours_flat_causal": round(loss_ours, 6),
        "loss_hf": round(loss_hf, 6),
        "repeats": repeats,
    }
    if compile_s is not None:
        results["compile_s"] = compile_s
    for name, s in seconds.items():
        results[f"{name}_ms"] = round(s * 1e3, 2)
        results[f"{name}_tokens_per_s"] = round(tokens / s, 1)
    for name in names[1:]:
        results[f"{name}_speedup"] = round(seconds["hf"] / seconds[name], 3)

    print(f"{'model':<27}{'step ms':>10}{'tokens/s':>11}{'vs hf':>8}")
    for name in seconds:
        speed = "" if name == "hf" else f"{results[f'{name}_speedup']:>8.2f}"
        print(f"{name:<27}{results[f'{name}_ms']:>10.1f}{results[f'{name}_tokens_per_s']:>11.0f}{speed}")
    print(f"{batch} x {seq_len} tokens, {results['docs_per_row']} documents per row, {results['dtype']}, "
          f"{results['threads']} threads, packed attention {args.attn_impl}")  # fmt: skip
    emit_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
