"""Quantizer throughput against vector-quantize-pytorch, side by side in one process (DESIGN §5).

    python benchmarks/bench_quantizers.py            # full sizes
    python benchmarks/bench_quantizers.py --quick    # a few seconds, for CI

fp32 on CPU, torch's default thread count. Each case alternates ours and the reference call by
call after a warm-up, and reports the median. ``speedup`` = reference ms / our ms (> 1: ours is
faster). Times are only reported, never asserted; FSQ codes and indices must equal the
reference's on the benchmark input (asserted).

Prints a readable table, then one JSON line ``{"bench": "quantizers", ...}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from vector_quantize_pytorch import FSQ as RefFSQ
from vector_quantize_pytorch import VectorQuantize as RefVQ

from tokenizers_mm.fsq import FSQ
from tokenizers_mm.vq import VectorQuantizer


def time_pair(
    ours: Callable[[], object], ref: Callable[[], object], warmup: int, repeats: int
) -> tuple[float, float]:
    """Median milliseconds of ``ours`` and ``ref``, called alternately so that load drifts hit both."""
    for _ in range(warmup):
        ours()
        ref()
    t_ours, t_ref = [], []
    for _ in range(repeats):
        for fn, acc in ((ours, t_ours), (ref, t_ref)):
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return statistics.median(t_ours) * 1e3, statistics.median(t_ref) * 1e3


def forward_backward(module: torch.nn.Module, z: torch.Tensor, pick: Callable[[object], torch.Tensor]):
    """A closure running forward + backward of ``sum(output)`` into a fresh gradient."""

    def run() -> None:
        z.grad = None
        pick(module(z)).sum().backward()

    return run


def bench_fsq(levels: list[int], shape: tuple[int, ...], warmup: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(*shape, len(levels), generator=g) * 2  # (b, n, d)
    ours, ref = FSQ(levels), RefFSQ(levels)
    out = ours(z)
    ref_codes, ref_indices = ref(z)
    assert torch.equal(out.quantized, ref_codes), "FSQ codes differ from vector-quantize-pytorch"
    assert torch.equal(out.indices, ref_indices.long()), "FSQ indices differ from vector-quantize-pytorch"
    results: dict[str, float] = {}
    with torch.no_grad():
        results["fsq_fwd_ms"], results["fsq_fwd_ref_ms"] = time_pair(
            lambda: ours(z), lambda: ref(z), warmup, repeats
        )
    zg = z.clone().requires_grad_(True)
    results["fsq_fwd_bwd_ms"], results["fsq_fwd_bwd_ref_ms"] = time_pair(
        forward_backward(ours, zg, lambda o: o.quantized),
        forward_backward(ref, zg, lambda o: o[0]),
        warmup,
        repeats,
    )
    return results


def _vq_pair(codebook_size: int, dim: int, gradient: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours and the reference with the same recipe: EMA (decay 0.99), k-means init on the first
    (warm-up) batch, commitment 0.25, no dead-code restarts (their criteria differ)."""
    torch.manual_seed(0)
    ours = VectorQuantizer(codebook_size, dim, gradient=gradient, decay=0.99, dead_code_steps=0)
    ref = RefVQ(
        dim,
        codebook_size,
        decay=0.99,
        commitment_weight=0.25,
        kmeans_init=True,
        rotation_trick=gradient == "rotation",
    )
    return ours.train(), ref.train()


def bench_vq(
    codebook_size: int, dim: int, shape: tuple[int, ...], warmup: int, repeats: int
) -> dict[str, float]:
    z = torch.randn(*shape, dim, generator=torch.Generator().manual_seed(1))  # (b, n, d)
    zg = z.clone().requires_grad_(True)
    results: dict[str, float] = {}

    ours, ref = _vq_pair(codebook_size, dim, "ste")
    with torch.no_grad():
        results["vq_train_fwd_ms"], results["vq_train_fwd_ref_ms"] = time_pair(
            lambda: ours(z), lambda: ref(z), warmup, repeats
        )
    results["vq_train_fwd_bwd_ste_ms"], results["vq_train_fwd_bwd_ste_ref_ms"] = time_pair(
        forward_backward(ours, zg, lambda o: o.quantized + o.loss),
        forward_backward(ref, zg, lambda o: o[0] + o[2]),
        warmup,
        repeats,
    )
    ours.eval()
    ref.eval()
    with torch.no_grad():
        results["vq_infer_ms"], results["vq_infer_ref_ms"] = time_pair(
            lambda: ours(z), lambda: ref(z), warmup, repeats
        )
        # Same codebook -> same nearest codes (our addmm lookup agrees with the reference's cdist).
        ref.codebook.copy_(ours.codebook.reshape(ref.codebook.shape))
        results["vq_index_agreement"] = (ours(z).indices == ref(z)[1].long()).float().mean().item()

    rot_ours, rot_ref = _vq_pair(codebook_size, dim, "rotation")
    results["vq_train_fwd_bwd_rotation_ms"], results["vq_train_fwd_bwd_rotation_ref_ms"] = time_pair(
        forward_backward(rot_ours, zg, lambda o: o.quantized + o.loss),
        forward_backward(rot_ref, zg, lambda o: o[0] + o[2]),
        warmup,
        repeats,
    )
    return results


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small inputs and few repeats (seconds, for CI)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 30, quick 7)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default 5, quick 2)")
    p.add_argument("--fsq-levels", type=int, nargs="+", default=[8, 5, 5, 5])
    p.add_argument("--codebook-size", type=int, default=1024)
    p.add_argument("--vq-dim", type=int, default=8)
    args = p.parse_args(argv)
    repeats = args.repeats or (7 if args.quick else 30)
    warmup = args.warmup or (2 if args.quick else 5)
    fsq_shape = (16, 1024) if args.quick else (64, 1024)
    vq_shape = (8, 256) if args.quick else (64, 256)

    results: dict[str, object] = {
        "bench": "quantizers",
        "quick": args.quick,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "fsq_input": [*fsq_shape, len(args.fsq_levels)],
        "fsq_levels": args.fsq_levels,
        "vq_input": [*vq_shape, args.vq_dim],
        "vq_codebook_size": args.codebook_size,
        "fsq_codes_identical": True,  # asserted in bench_fsq
    }
    results.update(bench_fsq(args.fsq_levels, fsq_shape, warmup, repeats))
    results.update(bench_vq(args.codebook_size, args.vq_dim, vq_shape, warmup, repeats))
    cases = [k[: -len("_ref_ms")] for k in results if k.endswith("_ref_ms")]
    for case in cases:
        results[f"{case}_speedup"] = round(results[f"{case}_ref_ms"] / results[f"{case}_ms"], 3)
    for k, v in list(results.items()):
        if k.endswith("_ms"):
            results[k] = round(v, 4)

    print(f"{'case':<28}{'ours ms':>10}{'ref ms':>10}{'speedup':>9}")
    for case in cases:
        print(
            f"{case:<28}{results[f'{case}_ms']:>10.3f}{results[f'{case}_ref_ms']:>10.3f}{results[f'{case}_speedup']:>9.2f}"
        )
    agreement = results["vq_index_agreement"]
    print(f"VQ nearest-code agreement with the reference on a shared codebook: {agreement:.4f}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
