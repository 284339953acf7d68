"""The same invariants on a DEVICE device: kernels, decoder, generation, tokenizer, trainer and pipelines.

Every test here is skipped without a GPU (CI has none). On a GPU machine run
``HF_HUB_OFFLINE=1 python -m pytest -q tests/test_cuda.py``. The references are the CPU results of the same
code (fp32) or the brute-force definition; bf16 is checked against fp32 with a bf16-sized tolerance.
``MMGEN_TEST_DEVICE=cpu`` dry-runs the module on a CPU (to catch API errors only: the CPU-vs-device
comparisons then hold trivially, and flex attention has no CPU backward).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

DEVICE = torch.device(os.environ.get("MMGEN_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)

from ar_model.attention import attend, block_causal_mask, doc_ids_from_seq_lens, plan_attention  # noqa: E402
from ar_model.config import MMDecoderConfig, vocab_layout  # noqa: E402
from ar_model.generation import generate_image_codes  # noqa: E402
from ar_model.modeling import MMDecoderForCausalLM  # noqa: E402
from ar_model.packing import build_packed_batch, pack_documents  # noqa: E402
from ar_model.sequence import build_sequence, image_to_text_document, text_to_image_document  # noqa: E402
from ar_model.text_tokenizer import TextTokenizer, train_text_tokenizer  # noqa: E402

SEQ_LENS = [[50, 30, 30, 18], [128], [40, 40], [70, 33, 25]]  # rows of 128 tokens, some padding
N = 128
NUM_CODES = 64
CAPTIONS = [
    "a red circle", "two blue stars above a green square", "a picture of three cyan crosses",
    "one yellow triangle left of a white diamond", "a purple star on a black background",
    "two orange squares",
]  # fmt: skip


@pytest.fixture(autouse=True)
def exact_fp32(monkeypatch) -> None:
    """fp32 means fp32: no TF32 in cuDNN convolutions (on by default) or cuBLAS matmuls."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return train_text_tokenizer(CAPTIONS * 20, None, vocab_size=400, max_image_side=8)


def _model(tok: TextTokenizer, **overrides) -> MMDecoderForCausalLM:
    torch.manual_seed(0)
    kw = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, initializer_range=0.2)
    return MMDecoderForCausalLM(MMDecoderConfig(**vocab_layout(tok, NUM_CODES), **{**kw, **overrides})).eval()


def _packed_batch(tok: TextTokenizer):
    g = torch.Generator().manual_seed(0)
    segs = []
    for i, caption in enumerate(CAPTIONS):
        codes = torch.randint(0, NUM_CODES, (2 + i % 3, 3 + i % 2), generator=g)  # (h, w)
        segs.append(
            text_to_image_document(caption, codes) if i % 2 else image_to_text_document(codes, caption)
        )
    docs = [build_sequence(s, tok).as_document() for s in segs]
    plan = pack_documents([d["input_ids"].shape[0] for d in docs], 64)
    return build_packed_batch(docs, plan, pad_id=tok.pad_id)


def _on(batch, device: torch.device) -> dict:
    return dict(
        input_ids=batch["input_ids"].to(device),
        positions=batch["positions"].to(device),
        labels=batch["labels"].to(device),
        doc_ids=batch.doc_ids.to(device),
        seq_lens=batch.seq_lens,
    )


# ----------------------------------------------------------------------------- attention kernels
def _skip_flex_on_cpu(impl: str) -> None:
    if impl == "flex" and DEVICE.type == "cpu":
        pytest.skip("flex_attention has no CPU backward (dry run)")


@pytest.mark.parametrize("impl", ["sdpa_per_doc", "sdpa_dense_mask", "flex"])
def test_packed_attention_kernels_match_the_cpu_reference(impl: str) -> None:
    _skip_flex_on_cpu(impl)
    g = torch.Generator().manual_seed(0)
    b, h, h_kv, d = len(SEQ_LENS), 4, 2, 64
    cpu = [torch.randn(b, hh, N, d, generator=g) for hh in (h, h_kv, h_kv)]  # q, k, v: (b, h, n, d)
    weight = torch.randn(b, h, N, d, generator=g)
    doc_ids = doc_ids_from_seq_lens(SEQ_LENS, N)
    real = (doc_ids >= 0)[:, None, :, None].float()  # (b, 1, n, 1): loss on real tokens only

    def run(tensors: list[torch.Tensor], plan) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        out = attend(*leaves, plan)
        (out * weight.to(out.device) * real.to(out.device)).sum().backward()
        return out.detach().cpu(), [t.grad.cpu() for t in leaves]

    ref_plan = plan_attention("sdpa_dense_mask", b, N, torch.device("cpu"), doc_ids=doc_ids)
    assert torch.equal(ref_plan.mask, block_causal_mask(doc_ids))
    ref_out, ref_grads = run(cpu, ref_plan)
    plan = plan_attention(impl, b, N, DEVICE, doc_ids=doc_ids.to(DEVICE), seq_lens=SEQ_LENS)
    out, grads = run([t.to(DEVICE) for t in cpu], plan)
    mask = real.bool().expand_as(out)
    torch.testing.assert_close(out[mask], ref_out[mask], atol=2e-5, rtol=1e-4)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- decoder
@pytest.mark.parametrize("attn_impl", ["sdpa_per_doc", "flex"])
def test_decoder_on_cuda_matches_cpu(tok: TextTokenizer, attn_impl: str) -> None:
    _skip_flex_on_cpu(attn_impl)
    batch = _packed_batch(tok)
    ref = _model(tok, attn_impl="sdpa_per_doc").train()
    model = _model(tok, attn_impl=attn_impl).to(DEVICE).train()
    out_ref, out = ref(**_on(batch, torch.device("cpu"))), model(**_on(batch, DEVICE))
    out_ref.loss.backward()
    out.loss.backward()
    real = batch.doc_ids >= 0
    torch.testing.assert_close(out.logits.cpu()[real], out_ref.logits[real], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss.cpu(), out_ref.loss, atol=1e-5, rtol=1e-5)
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.cpu(), p_ref.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("attn_impl", ["sdpa_per_doc", "flex"])
def test_bf16_autocast_step_is_finite_and_close_to_fp32(tok: TextTokenizer, attn_impl: str) -> None:
    """As the trainer runs under --mixed_precision bf16 (QK-norm on: fp32 q, k beside bf16 v)."""
    _skip_flex_on_cpu(attn_impl)
    batch = _on(_packed_batch(tok), DEVICE)
    model = _model(tok, attn_impl=attn_impl, qk_norm=True).to(DEVICE).train()
    fp32 = model(**batch).loss
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        bf16 = model(**batch).loss
    bf16.backward()
    assert torch.isfinite(bf16) and abs(bf16.item() - fp32.item()) <= 2e-2 * fp32.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_on_cuda_cached_equals_uncached(tok: TextTokenizer, dtype: torch.dtype) -> None:
    model = _model(tok).to(device=DEVICE, dtype=dtype)
    prompts = [torch.tensor([tok.bos_id, *tok.encode(c)], device=DEVICE) for c in CAPTIONS[:3]]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, guidance_scale=3.0)):
        a, b = (
            generate_image_codes(
                model, prompts, 3, 4, generator=torch.Generator(DEVICE).manual_seed(0), use_cache=cache, **kw
            )
            for cache in (True, False)
        )
        assert a.shape == (3, 3, 4) and 0 <= int(a.min()) and int(a.max()) < NUM_CODES
        if dtype == torch.float32:  # bf16 logits of a cached step and a full forward may round apart
            assert torch.equal(a, b), kw


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_on_cuda_matches_cpu() -> None:
    from tiny import TINY_TOKENIZER

    from tokenizers_mm import ImageTokenizer
    from tokenizers_mm.presets import preset_config

    torch.manual_seed(0)
    ref = ImageTokenizer(preset_config("fsq-8x8", resolution=32, **TINY_TOKENIZER)).eval()
    model = ImageTokenizer(ref.config).to(DEVICE).eval()
    model.load_state_dict(ref.state_dict())
    pixels = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        codes_ref, codes = ref.encode(pixels), model.encode(pixels.to(DEVICE)).cpu()
        assert (codes == codes_ref).float().mean() >= 0.99  # rounding at an FSQ level boundary may differ
        torch.testing.assert_close(
            model.decode(codes_ref.to(DEVICE)).cpu(), ref.decode(codes_ref), atol=1e-4, rtol=0
        )


# ----------------------------------------------------------------------------- trainer and pipelines
def test_ema_copy_lives_on_the_training_device() -> None:
    """Both trainers build the EMA before accelerate moves the model: it must be on the device anyway."""
    from tokenizers_mm.train_step import ema_copy

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))  # on the CPU
    ema = ema_copy(model, 0.9, DEVICE)
    assert all(t.device.type == DEVICE.type for t in [*ema.parameters(), *ema.buffers()])
    ema.update_parameters(model.to(DEVICE))
    torch.testing.assert_close(ema.module[0].weight, model[0].weight)


def test_trainer_and_pipelines_run_on_cuda(tmp_path: Path) -> None:
    from tiny import save_tiny_tokenizer, tiny_train_config
    from transformers import pipeline

    from ar_model.generator import MMGenerator
    from ar_model.train import main
    from pipelines import ImageToTextPipeline

    cfg = tiny_train_config(
        save_tiny_tokenizer(tmp_path / "tokenizer"), tmp_path / "run", log_every=10, ema_decay=0.9
    )
    main(cfg)  # in-process: accelerate puts the model on the GPU; the EMA copy follows (ema_copy)
    folder = tmp_path / "run" / "final"
    model = MMGenerator.from_pretrained(folder).to(DEVICE)
    t2i = pipeline("text-to-image", model=model)
    assert t2i.device.type == DEVICE.type
    a = [
        np.asarray(r["image"])
        for r in t2i("a red circle", num_images_per_prompt=2, generator=3, progress_bar=False)
    ]
    b = [
        np.asarray(r["image"])
        for r in t2i("a red circle", num_images_per_prompt=2, generator=3, progress_bar=False)
    ]
    assert len(a) == 2 and a[0].shape == (32, 32, 3) and all((x == y).all() for x, y in zip(a, b))
    captions = ImageToTextPipeline(model=model)(
        [r["image"] for r in t2i("two blue squares", progress_bar=False)]
    )
    assert isinstance(captions[0][0]["generated_text"], str)
