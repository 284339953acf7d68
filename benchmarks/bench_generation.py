"""Generation throughput with a KV cache against transformers' ``generate()``, side by side (issues 3, 6).

    python benchmarks/bench_generation.py                # batch 1 and 8, 64 and 256 new tokens
    python benchmarks/bench_generation.py --threads 1    # as the CPU pipelines run
    python benchmarks/bench_generation.py --quick        # seconds, for CI
    python benchmarks/bench_generation.py --preset base  # GPU: the 103M preset's dimensions

Both models have the same weights (ours copied into a ``LlamaForCausalLM``; flat 1-D RoPE, no QK-norm)
and the training benchmark's dimensions (hidden 256, 4 layers, 4 heads, SwiGLU 1024, vocabulary 4096).
Weights are drawn with std 0.1 (instead of 0.02) so that greedy decoding has no near-ties and both
implementations pick the same tokens in fp32; the agreement is reported. In bf16 it is not expected:
rounding flips near-ties, after which the two streams part, so ``logit_rel_err_vs_fp32`` gives each
model's logit error against an fp32 copy (on the last batch's prompts) and how often its argmax keeps
fp32's. Each case decodes greedily from the same random prompt of ``--prompt-len`` tokens, over the
whole vocabulary, exactly ``new`` tokens per row (no end-of-sequence stop):

* ours: ``ar_model.generation.generate_tokens(model, ids, None, new, eos_id=-1, allowed_range=(0, V))``;
* hf: ``model.generate(ids, attention_mask=1, max_new_tokens=new, min_new_tokens=new, do_sample=False)``.

Tokens/s = batch × new tokens / wall time of the whole call (prefill included), median over
``--repeats`` alternating calls. ``speedup`` = hf time / ours. Prints a table and one JSON line
``{"bench": "generation", ...}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import emit_json  # noqa: E402
from bench_decoder_train import llama_twin, time_interleaved  # noqa: E402
from bench_packing import preset_dims  # noqa: E402

from ar_model.config import MMDecoderConfig  # noqa: E402
from ar_model.generation import generate_tokens  # noqa: E402
from ar_model.modeling import MMDecoderForCausalLM  # noqa: E402


@torch.no_grad()
def logit_errors(
    models: dict[str, torch.nn.Module], reference: torch.nn.Module, ids: torch.Tensor
) -> dict[str, float]:
    """‖logits − fp32 logits‖ / ‖fp32 logits‖ of each (low-precision) model on ``ids``, and how often its
    next-token argmax agrees with fp32's: greedy streams of two bf16 models part at the first flip."""
    ref = reference(ids).logits.float()  # (b, n, V)
    out = {}
    for name, model in models.items():
        logits = model(ids).logits.float()
        out[name] = round(((logits - ref).norm() / ref.norm()).item(), 5)
        out[f"{name}_argmax_agreement"] = round(
            (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small model, few tokens (seconds, for CI)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="default: fp32 CPU, bf16 CUDA"
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new", type=int, nargs="+", default=None, help="new tokens per row (default 64 256)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--preset", default=None, help="dimensions of an ar_model preset (base: GPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 7, quick 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    new_tokens = args.new or ([16] if args.quick else [64, 256])
    repeats = args.repeats or (2 if args.quick else 7)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    dims = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)
    if args.preset is not None:
        dims = preset_dims(args.preset)
    elif args.quick:
        dims.update(hidden_size=64, num_layers=2, intermediate_size=128)
    cfg = MMDecoderConfig(
        vocab_size=4096, text_vocab_size=1024, num_image_codes=1024, max_image_side=16, rope_scheme="flat",
        qk_norm=False, initializer_range=0.1, **dims,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = MMDecoderForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    hf = llama_twin(ours).eval()
    fp32_ref = None
    if dtype != torch.float32:  # to tell bf16 rounding from a disagreement of the implementations
        torch.manual_seed(0)
        fp32_ref = MMDecoderForCausalLM(cfg).to(device=device).eval()
    vocab = cfg.vocab_size

    results: dict[str, object] = {
        "bench": "generation",
        "quick": args.quick,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompt_len": args.prompt_len,
        "preset": args.preset,
        "model": {
            k: getattr(cfg, k)
            for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")
        },
        "cases": [],
    }
    g = torch.Generator().manual_seed(1)
    for batch in args.batch:
        ids = torch.randint(6, vocab, (batch, args.prompt_len), generator=g).to(device)
        mask = torch.ones_like(ids)
        for new in new_tokens:

            def run_ours(ids=ids, new=new):
                return generate_tokens(ours, ids, None, new, eos_id=-1, allowed_range=(0, vocab))

            def run_hf(ids=ids, mask=mask, new=new):
                return hf.generate(
                    ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                    eos_token_id=None, pad_token_id=0,
                )[:, ids.shape[1] :]  # fmt: skip

            agree = (run_ours() == run_hf()).float().mean().item()
            seconds = time_interleaved({"ours": run_ours, "hf": run_hf}, 1, repeats, sync)
            tokens = batch * new
            results["cases"].append(
                {
                    "batch": batch,
                    "new_tokens": new,
                    "ours_ms": round(seconds["ours"] * 1e3, 2),
                    "hf_ms": round(seconds["hf"] * 1e3, 2),
                    "ours_tokens_per_s": round(tokens / seconds["ours"], 1),
                    "hf_tokens_per_s": round(tokens / seconds["hf"], 1),
                    "speedup": round(seconds["hf"] / seconds["ours"], 3),
                    "token_agreement": round(agree, 4),
                }
            )
    results["min_speedup"] = min(c["speedup"] for c in results["cases"])
    if fp32_ref is not None:
        results["logit_rel_err_vs_fp32"] = logit_errors({"ours": ours, "hf": hf}, fp32_ref, ids)

    print(f"{'batch':>5}{'new':>6}{'ours tok/s':>12}{'hf tok/s':>10}{'speedup':>9}{'agree':>7}")
    for c in results["cases"]:
        print(
            f"{c['batch']:>5}{c['new_tokens']:>6}{c['ours_tokens_per_s']:>12.0f}{c['hf_tokens_per_s']:>10.0f}"
            f"{c['speedup']:>9.2f}{c['token_agreement']:>7.2f}"
        )
    print(f"prompt {args.prompt_len} tokens, greedy, {results['dtype']}, {results['threads']} threads")
    if fp32_ref is not None:
        print(
            f"logits vs an fp32 copy (relative error, argmax agreement): {results['logit_rel_err_vs_fp32']}"
        )
    emit_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
