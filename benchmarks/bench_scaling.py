"""How cost grows: train-step time vs sequence length, image generation time vs image size, and MFU.

    python benchmarks/bench_scaling.py                # rows 256..4096, 4096 tokens/step; 4x4..32x32 images
    python benchmarks/bench_scaling.py --threads 1    # as the CPU trainer runs (1 thread/process)
    python benchmarks/bench_scaling.py --quick        # seconds, for CI

Three measurements in one process:

* **peak**: the machine's matmul throughput in the training dtype, measured here and now (other jobs
  sharing the cores slow it down as they slow the model): the median GFLOP/s of repeated square
  ``torch.mm`` at each of ``--peak-sizes``, the best size taken as the peak.
* **train**: one training step (forward, backward, ``AdamW.step``; ``bench_decoder_train.train_step``)
  of our decoder and of ``LlamaForCausalLM`` with the same dimensions and weights
  (``bench_decoder_train.llama_twin``; hidden 256, 4 layers, 4 heads, SwiGLU 1024, vocabulary 4096,
  no QK-norm) at each ``--seq-lens``, with the tokens per step held fixed (``batch = tokens / seq_len``
  rows): only attention's cost depends on the row length, so the growth of the step time is attention's
  share. Rows are the real caption documents of ``bench_decoder_train`` (``bench_packing.caption_documents``
  packed to ``seq_len``), run as plain causal rows with 1-D positions (``ours_flat_causal`` there: the
  same computation as Llama). Attention within documents, as the trainer runs, would hide the growth:
  these documents have ~80 tokens whatever the row length. For each model: ms/step, tokens/s, the
  step-time ratio to the first (shortest) length, achieved model FLOP/s and MFU = achieved / peak
  (see :func:`train_flops_per_token`). Contenders alternate, medians of ``--repeats``.
* **generation**: ``ar_model.generation.generate_image_codes`` (KV cache, temperature 1, no guidance)
  after one ``<bos> caption`` prompt, batch 1, for each ``--image-sides`` square grid of s×s codes
  (our decoder as it trains: ``rope_tv`` positions, QK-norm; untrained weights: the cost does not
  depend on them). Seconds per image (prefill included), ms per image token, and both ratios to the
  first (smallest) image. Sizes alternate, medians of ``--repeats``.

fp32 on CPU, bf16 weights on CUDA (``--dtype``). Prints markdown tables and one JSON line
``{"bench": "scaling", ...}``. Timings are never asserted.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import emit_json  # noqa: E402
from bench_decoder_train import llama_twin, time_interleaved, train_step  # noqa: E402
from bench_packing import caption_documents, decoder_config, packed_batches  # noqa: E402

from ar_model.config import MMDecoderConfig  # noqa: E402
from ar_model.generation import generate_image_codes  # noqa: E402
from ar_model.modeling import MMDecoderForCausalLM  # noqa: E402
from ar_model.packing import IGNORE_INDEX  # noqa: E402
from ar_model.text_tokenizer import train_text_tokenizer  # noqa: E402
from data.shapes import generate_shapes  # noqa: E402

Sync = Callable[[], None]


# ----------------------------------------------------------------------------- FLOPs
def matmul_params(model: MMDecoderForCausalLM) -> int:
    """Parameters that take part in matmuls: all but the input embedding table (a lookup, no FLOPs).

    The untied LM head is a matmul and counts; the RMSNorm weights (~0.1% here) are left in.
    """
    total = sum(p.numel() for p in model.parameters())
    if model.config.tie_embeddings:
        return total  # the table is also the LM head's matmul weight
    return total - model.model.embed_tokens.weight.numel()


def train_flops_per_token(config: MMDecoderConfig, n_params: int, seq_len: int) -> int:
    """Model FLOPs of one training step (forward + backward) per token of a row of ``seq_len`` tokens.

    ``6 N + 12 L H Q T`` (Kaplan et al. 2020, "Scaling Laws for Neural Language Models",
    arXiv:2001.08361, Table 1 and §2.1; Chowdhery et al. 2022, "PaLM", arXiv:2204.02311, Appendix B):
    each of the ``N`` matmul weights costs 2 FLOPs per token forward and 4 backward (6N); attention's
    two matmuls (``Q K^T`` and ``A V``) cost ``2 · 2 · T · H · Q`` forward per token and layer, times 3
    with the backward. ``L`` layers, ``H`` heads of ``Q`` channels (``H · Q`` = hidden here, so the
    term is ``12 · layers · hidden · seq_len``), ``T`` = ``seq_len``. This is PaLM's count (Kaplan et
    al. list ``2 n_layer n_ctx d_attn`` forward, half of it): the full ``T × T`` score matrix, although a
    causal kernel that skips masked blocks does about half of that work. These are *model* FLOPs, the
    convention MFU is defined with (PaLM, Appendix B), not the FLOPs the kernels happen to execute.
    """
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return 6 * n_params + attention


def matmul_peak(
    sizes: list[int], repeats: int, device: torch.device, dtype: torch.dtype, sync: Sync
) -> dict[str, object]:
    """Median GFLOP/s of ``torch.mm`` on square ``n × n`` matrices for each ``n``, and the best of them."""
    gflops: dict[str, float] = {}
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)  # (n, n)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)  # (n, n)
        torch.mm(a, b)  # warm-up: first-call allocations and kernel selection
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            torch.mm(a, b)
            sync()
            times.append(time.perf_counter() - start)
        gflops[str(n)] = round(2 * n**3 / statistics.median(times) / 1e9, 2)  # n^2 outputs, n MACs each
    return {"sizes": sizes, "gflops": gflops, "peak_gflops": max(gflops.values())}


# ----------------------------------------------------------------------------- train step vs seq len
def train_scaling(
    seq_lens: list[int],
    tokens: int,
    quick: bool,
    with_hf: bool,
    *,
    preset: str | None,
    peak_gflops: float,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    sync: Sync,
) -> dict[str, object]:
    """Step time of each model at each row length, ``tokens`` tokens per step (see the module docstring)."""
    # Real caption documents, enough for `tokens` tokens at any row length (~75-85 tokens each; a
    # document longer than a row is split into row-sized chunks by the packer).
    docs, tok = caption_documents(tokens // 60 + 2, "flat")
    torch.manual_seed(0)
    cfg = decoder_config(tok, "flat", quick, preset, qk_norm=False, max_position=max(4096, *seq_lens))
    models: dict[str, torch.nn.Module] = {"ours": MMDecoderForCausalLM(cfg).to(device=device, dtype=dtype)}
    if with_hf:
        models["hf"] = llama_twin(models["ours"])
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    n_params = matmul_params(models["ours"])

    cases, first = [], {}  # first: seconds per step of each model at the shortest rows
    for seq_len in seq_lens:
        batch = tokens // seq_len
        packed = packed_batches(docs, seq_len, batch, tok.pad_id)[0]
        ids, labels = packed["input_ids"].to(device), packed["labels"].to(device)  # (batch, seq_len) each
        assert ids.shape == (batch, seq_len), (ids.shape, batch, seq_len)
        # positions=None: 1-D positions 0..seq_len-1, as Llama's; no documents: one causal block per row.
        inputs = {"ours": {"input_ids": ids, "labels": labels}}
        # transformers shifts labels inside: give it ours shifted right, so both predict the same targets.
        hf_labels = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels[:, :-1]], dim=1)
        inputs["hf"] = {"input_ids": ids, "labels": hf_labels}
        steps = {name: train_step(m, inputs[name], optimizers[name]) for name, m in models.items()}
        seconds = time_interleaved(steps, warmup, repeats, sync)
        first = first or seconds

        flops_per_token = train_flops_per_token(cfg, n_params, seq_len)
        case: dict[str, object] = {
            "seq_len": seq_len,
            "batch": batch,
            "flops_per_token": flops_per_token,
            "attn_flops_fraction": round(1 - 6 * n_params / flops_per_token, 4),
        }
        for name, s in seconds.items():
            achieved_gflops = flops_per_token * tokens / s / 1e9
            case[f"{name}_ms"] = round(s * 1e3, 2)
            case[f"{name}_tokens_per_s"] = round(tokens / s, 1)
            case[f"{name}_ratio"] = round(s / first[name], 3)  # the same tokens per step: per-token cost
            case[f"{name}_gflops"] = round(achieved_gflops, 3)
            case[f"{name}_mfu"] = round(achieved_gflops / peak_gflops, 4)
        cases.append(case)
    return {
        "tokens_per_step": tokens,
        "models": list(models),
        "model": {
            k: getattr(cfg, k)
            for k in ("hidden_size", "num_layers", "num_heads", "head_dim", "intermediate_size", "vocab_size")
        },
        "params": sum(p.numel() for p in models["ours"].parameters()),
        "matmul_params": n_params,
        "flops_formula": "6*matmul_params + 12*num_layers*num_heads*head_dim*seq_len per token",
        "cases": cases,
    }


# ----------------------------------------------------------------------------- generation vs image size
def generation_scaling(
    sides: list[int],
    quick: bool,
    *,
    preset: str | None,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    sync: Sync,
) -> dict[str, object]:
    """Seconds to generate one ``s × s`` image of codes for each side ``s`` (see the module docstring)."""
    captions = [sample.caption for sample in generate_shapes(200, seed=0)]
    tok = train_text_tokenizer(captions, None, vocab_size=600, max_image_side=max(16, *sides))
    prompt = torch.tensor([tok.bos_id, *tok.encode(captions[0])], device=device)  # (n,)
    longest = prompt.shape[0] + 3 + max(sides) ** 2  # prompt, <boi> <h> <w>, the codes
    torch.manual_seed(0)
    cfg = decoder_config(tok, "rope_tv", quick, preset, max_position=max(4096, longest))
    model = MMDecoderForCausalLM(cfg).to(device=device, dtype=dtype).eval()

    def image(side: int) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            g = torch.Generator(device=device).manual_seed(0)
            return generate_image_codes(model, [prompt], side, side, temperature=1.0, generator=g)

        return run

    codes = image(sides[0])()
    assert (
        codes.shape == (1, sides[0], sides[0])
        and 0 <= int(codes.min()) <= int(codes.max()) < cfg.num_image_codes
    )
    seconds = time_interleaved({str(s): image(s) for s in sides}, warmup, repeats, sync)
    first = seconds[str(sides[0])]
    cases = []
    for side in sides:
        s, n = seconds[str(side)], side * side
        cases.append(
            {
                "h": side,
                "w": side,
                "image_tokens": n,
                "seconds": round(s, 5),
                "ms_per_token": round(s * 1e3 / n, 4),
                "ratio": round(s / first, 3),  # relative to the smallest image
                "ms_per_token_ratio": round(s / n / (first / sides[0] ** 2), 3),
            }
        )
    return {
        "prompt_len": prompt.shape[0],
        "batch": 1,
        "sampling": "temperature 1.0, no guidance, KV cache",
        "model": {
            k: getattr(cfg, k) for k in ("hidden_size", "num_layers", "num_heads", "rope_scheme", "qk_norm")
        },
        "cases": cases,
    }


# ----------------------------------------------------------------------------- report
def print_tables(results: dict) -> None:
    """Markdown tables of the three measurements."""
    peak = results["peak"]
    sizes = ", ".join(f"{n}: {g:.1f}" for n, g in peak["gflops"].items())
    print(f"Matmul peak ({results['dtype']}, {results['threads']} threads): {peak['peak_gflops']:.1f} "
          f"GFLOP/s (torch.mm GFLOP/s by size: {sizes})\n")  # fmt: skip

    train = results["train"]
    models = train["models"]
    head = "| seq_len | batch | attn FLOPs |"
    rule = "|---:|---:|---:|"
    for name in models:
        head += f" {name} ms | {name} tok/s | {name} × | {name} GFLOP/s | {name} MFU |"
        rule += "---:|---:|---:|---:|---:|"
    print(f"Training step, {train['tokens_per_step']} tokens per step (× = step time / first row):\n")
    print(head)
    print(rule)
    for c in train["cases"]:
        row = f"| {c['seq_len']} | {c['batch']} | {c['attn_flops_fraction']:.0%} |"
        for name in models:
            row += (
                f" {c[f'{name}_ms']:.1f} | {c[f'{name}_tokens_per_s']:.0f} | {c[f'{name}_ratio']:.2f} |"
                f" {c[f'{name}_gflops']:.2f} | {c[f'{name}_mfu']:.1%} |"
            )
        print(row)

    gen = results["generation"]
    print(
        f"\nImage generation, batch 1, {gen['prompt_len']}-token prompt (× = relative to the first image):\n"
    )
    print("| image | tokens | s/image | ms/token | × image | × per token |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in gen["cases"]:
        print(
            f"| {c['h']}×{c['w']} | {c['image_tokens']} | {c['seconds']:.3f} | {c['ms_per_token']:.3f} |"
            f" {c['ratio']:.2f} | {c['ms_per_token_ratio']:.2f} |"
        )


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="tiny model, short rows, small images (seconds, for CI)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="default: fp32 CPU, bf16 CUDA"
    )
    p.add_argument(
        "--seq-lens", type=int, nargs="+", default=None, help="row lengths (default 256..4096, quick 64 128)"
    )
    p.add_argument(
        "--tokens-per-step",
        type=int,
        default=None,
        help="tokens per training step (default: the longest row)",
    )
    p.add_argument(
        "--image-sides",
        type=int,
        nargs="+",
        default=None,
        help="s for s×s images (default 4 8 16 32, quick 2 4)",
    )
    p.add_argument(
        "--peak-sizes", type=int, nargs="+", default=None, help="torch.mm sizes (default 512 1024 2048)"
    )
    p.add_argument("--preset", default=None, help="dimensions of an ar_model preset (base: GPU)")
    p.add_argument("--no-hf", action="store_true", help="time our decoder only (no LlamaForCausalLM peer)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 5, quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default 1, quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    seq_lens = args.seq_lens or ([64, 128] if args.quick else [256, 512, 1024, 2048, 4096])
    tokens = args.tokens_per_step or max(seq_lens)
    if any(tokens % n for n in seq_lens):
        p.error(f"--tokens-per-step {tokens} must be a multiple of every seq len {seq_lens}")
    sides = args.image_sides or ([2, 4] if args.quick else [4, 8, 16, 32])
    peak_sizes = args.peak_sizes or ([128, 256] if args.quick else [512, 1024, 2048])
    repeats = args.repeats or (1 if args.quick else 5)
    warmup = args.warmup or 1
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    peak = matmul_peak(peak_sizes, max(repeats, 3), device, dtype, sync)
    results: dict[str, object] = {
        "bench": "scaling",
        "quick": args.quick,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "repeats": repeats,
        "peak": peak,
        "preset": args.preset,
    }
    timing = dict(device=device, dtype=dtype, warmup=warmup, repeats=repeats, sync=sync, preset=args.preset)
    results["train"] = train_scaling(
        seq_lens, tokens, args.quick, not args.no_hf, peak_gflops=peak["peak_gflops"], **timing
    )
    results["generation"] = generation_scaling(sides, args.quick, **timing)

    print_tables(results)
    emit_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
