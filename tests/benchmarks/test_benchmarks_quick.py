"""The committed benchmark scripts run in --quick mode so they cannot rot. Their timings are not
asserted (timings belong in the README, measured as ratios); their JSON output and checks are."""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_bench_quantizers_quick():
    rows = _run("bench_quantizers.py")
    assert rows and rows[0]["bench"] == "quantizers"


@pytest.mark.slow
def test_tokenizer_targets_quick(tmp_path):
    rows = _run("tokenizer_targets.py", "--only", "fsq_8x8", "patches_4", "--out", str(tmp_path))
    assert [r["run"] for r in rows] == ["fsq_8x8", "patches_4"]
    assert rows[1]["photos_psnr"] > 90  # raw patches are lossless
    assert rows[1]["judge_overall"] == 1.0  # so the judge passes every reconstructed scene
    assert 0 <= rows[0]["judge_overall"] < 1.0  # a 3-step tokenizer's reconstructions do not pass


def test_bench_decoder_train_quick(tmp_path):
    out = tmp_path / "train.json"
    rows = _run("bench_decoder_train.py", "--out", str(out))
    assert len(rows) == 1 and json.loads(out.read_text()) == rows[0]
    r = rows[0]
    assert r["bench"] == "decoder_train" and r["quick"] and r["device"] == "cpu"
    for name in ("hf", "ours_rope_tv", "ours_flat", "ours_flat_causal"):
        assert r[f"{name}_ms"] > 0 and r[f"{name}_tokens_per_s"] > 0
    for name in ("ours_rope_tv", "ours_flat", "ours_flat_causal"):
        assert r[f"{name}_speedup"] > 0
    assert abs(r["loss_ours_flat_causal"] - r["loss_hf"]) < 1e-3  # the same computation as Llama
    assert r["docs_per_row"] > 1 and 0 < r["useful_fraction"] <= 1  # real packed rows


def test_bench_generation_quick(tmp_path):
    out = tmp_path / "generation.json"
    rows = _run("bench_generation.py", "--out", str(out))
    assert len(rows) == 1 and json.loads(out.read_text()) == rows[0]
    r = rows[0]
    assert r["bench"] == "generation" and r["quick"]
    assert [(c["batch"], c["new_tokens"]) for c in r["cases"]] == [(1, 16), (8, 16)]
    for c in r["cases"]:
        assert c["ours_tokens_per_s"] > 0 and c["hf_tokens_per_s"] > 0 and c["speedup"] > 0
        assert c["token_agreement"] == 1.0  # greedy decoding of the same weights picks the same tokens


def test_bench_packing_quick(tmp_path):
    out = tmp_path / "packing.json"
    rows = _run("bench_packing.py", "--out", str(out))
    assert len(rows) == 1 and json.loads(out.read_text()) == rows[0]
    r = rows[0]
    assert r["bench"] == "packing" and r["quick"]
    packed, padded = r["packed"], r["padded"]
    assert packed["useful_tokens"] == padded["useful_tokens"]  # the same documents, once each
    assert packed["useful_fraction"] > padded["useful_fraction"]
    assert packed["useful_tokens_per_s"] > 0 and padded["useful_tokens_per_s"] > 0
    joined = r["joined"]  # the packed batches without row-end padding: the same documents, all useful
    assert joined["useful_tokens"] == packed["useful_tokens"] and joined["useful_fraction"] == 1.0
    assert joined["steps"] == packed["steps"] and r["joined_vs_packed_speedup"] > 0


def test_bench_code_groups_quick(tmp_path):
    out = tmp_path / "groups.json"
    rows = _run("bench_code_groups.py", "--out", str(out))
    assert len(rows) == 1 and json.loads(out.read_text()) == rows[0]
    r = rows[0]
    assert r["bench"] == "code_groups" and r["quick"]
    g1, g2 = r["g1"], r["g2"]
    # the same documents: 2x2 groups turn each 8x8 image's 64 tokens into 16 positions
    assert g1["useful_tokens"] - g2["useful_tokens"] == 48 * r["documents"]
    assert g1["docs_per_s"] > 0 and g2["images_per_s"] > 0 and r["train_docs_per_s_ratio"] > 0


def test_bench_diffusion_head_quick(tmp_path, monkeypatch):
    out = tmp_path / "head.json"
    rows = _run("bench_diffusion_head.py", "--out", str(out), "--threads", "1")
    assert len(rows) == 1 and json.loads(out.read_text()) == rows[0]
    names = [r["name"] for r in rows[0]["rows"]]
    assert names == ["euler-50", "shortcut-1", "shortcut-2", "shortcut-4"]
    assert rows[0]["tokens_per_image"] == 64 and all(r["head_ms_per_token"] > 0 for r in rows[0]["rows"])
    # few-step rows at their own CFG / temperature; the baseline keeps --guidance_scale / --temperature
    own = _run(
        "bench_diffusion_head.py", "--threads", "1", "--guidance_scale", "4", "--temperature", "1.2",
        "--shortcut", "1:2:1", "1:3:1", "2:3:1:0.5-1",
    )[0]["rows"]  # fmt: skip
    assert [(r["name"], r["steps"], r["guidance_scale"], r["temperature"]) for r in own] == [
        ("euler-50", 50, 4.0, 1.2), ("shortcut-1@2/1", 1, 2.0, 1.0), ("shortcut-1@3/1", 1, 3.0, 1.0),
        ("shortcut-2@3/1/0.5-1", 2, 3.0, 1.0),
    ]  # fmt: skip
    assert own[-1]["guidance_interval"] == [0.5, 1.0] and "guidance_interval" not in own[1]
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the script imports bench_common beside it
    parse = importlib.import_module("bench_diffusion_head").parse_shortcut
    assert parse("2:3:1.2:0.5-1") == {"steps": 2, "guidance_scale": 3.0, "temperature": 1.2,
                                      "guidance_interval": (0.5, 1.0)}  # fmt: skip
    for bad in ("1:2", "0:2:1", "1:-1:1", "1:2:0", "x:2:1", "2:3:1:0.5", "2:3:1:0.6-0.2", "1:2:1:0-1:x"):
        with pytest.raises(ValueError):
            parse(bad)


def test_bench_scaling_quick(tmp_path):
    out = tmp_path / "scaling.json"
    rows = _run("bench_scaling.py", "--out", str(out), "--threads", "1")
    assert len(rows) == 1 and json.loads(out.read_text()) == rows[0]
    r = rows[0]
    assert r["bench"] == "scaling" and r["quick"] and r["device"] == "cpu"
    peak = r["peak"]
    assert all(g > 0 for g in peak["gflops"].values()) and peak["peak_gflops"] == max(peak["gflops"].values())

    train = r["train"]
    assert train["models"] == ["ours", "hf"]
    assert [(c["seq_len"], c["batch"]) for c in train["cases"]] == [(64, 2), (128, 1)]  # 128 tokens/step
    assert 0 < train["matmul_params"] < train["params"]  # the input embedding does no matmul
    for c in train["cases"]:
        assert c["seq_len"] * c["batch"] == train["tokens_per_step"]
        # 6 N + 12 L H Q T model FLOPs per token (Kaplan et al. 2020; PaLM appendix B)
        m = train["model"]
        attention = 12 * m["num_layers"] * m["num_heads"] * m["head_dim"] * c["seq_len"]
        assert c["flops_per_token"] == 6 * train["matmul_params"] + attention
        assert 0 < c["attn_flops_fraction"] < 1
        for name in train["models"]:
            assert c[f"{name}_ms"] > 0 and c[f"{name}_tokens_per_s"] > 0 and c[f"{name}_ratio"] > 0
            assert c[f"{name}_gflops"] > 0 and math.isfinite(c[f"{name}_mfu"]) and c[f"{name}_mfu"] > 0
    fractions = [c["attn_flops_fraction"] for c in train["cases"]]
    assert fractions == sorted(fractions)  # attention's share of the FLOPs grows with the row length
    assert all(train["cases"][0][f"{name}_ratio"] == 1.0 for name in train["models"])

    gen = r["generation"]
    assert [(c["h"], c["w"], c["image_tokens"]) for c in gen["cases"]] == [(2, 2, 4), (4, 4, 16)]
    for c in gen["cases"]:
        assert c["seconds"] > 0 and c["ms_per_token"] > 0 and c["ratio"] > 0 and c["ms_per_token_ratio"] > 0
    assert gen["cases"][0]["ratio"] == 1.0 and gen["cases"][0]["ms_per_token_ratio"] == 1.0


def test_bench_streaming_quick(tmp_path):
    out = tmp_path / "streaming.json"
    rows = _run("bench_streaming.py", "--out", str(out))
    assert len(rows) == 1 and json.loads(out.read_text()) == rows[0]
    r = rows[0]
    assert r["bench"] == "streaming" and r["quick"] and r["shards"] == 8 and r["shard_mb"] > 0
    assert [c["workers"] for c in r["cases"]] == [0, 1]
    for c in r["cases"]:
        assert c["images"] == 64  # every built image is read once per epoch, whatever the workers
        assert c["images_per_s"] > 0 and c["mb_per_s"] > 0


def test_bench_decoder_train_takes_a_preset(tmp_path):
    """--preset swaps in a named preset's dimensions (base: the GPU preset; tiny here)."""
    rows = _run("bench_decoder_train.py", "--preset", "tiny", "--repeats", "1")
    m = rows[0]["model"]
    assert rows[0]["preset"] == "tiny" and (m["hidden_size"], m["num_hidden_layers"]) == (128, 4)
    assert abs(rows[0]["loss_ours_flat_causal"] - rows[0]["loss_hf"]) < 1e-3


@pytest.mark.slow
def test_quickstart_budget_smoke(tmp_path):
    """The budget script runs the main job, times its six steps and samples the memory of its process tree."""
    out = tmp_path / "budget.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quickstart_budget.py"), "--preset", "smoke",
         "--out", str(tmp_path / "qs"), "--json", str(out), "--decoder_steps", "2"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["bench"] == "quickstart_budget" and r["preset"] == "smoke"
    assert r["job_args"] == ["--decoder_steps", "2"]  # forwarded to the job, which trained 2 steps
    assert json.loads((tmp_path / "qs" / "decoder" / "train_config.json").read_text())["max_steps"] == 2
    assert [s["step"][0] for s in r["steps"]] == list("123456")  # every step, in order
    assert all(s["seconds"] >= 0 for s in r["steps"])
    assert abs(sum(s["seconds"] for s in r["steps"]) - r["wall_s"]) < 0.5  # the steps tile the run
    assert 0.1 < r["peak_rss_max_process_gib"] <= r["peak_rss_sum_gib"] < 24  # torch alone is > 100 MB
    assert 0 < r["peak_pss_sum_gib"] <= r["peak_rss_sum_gib"]  # Linux: shared pages counted once
    # each step's own peak; the largest is the run's peak, and the processes then add up to it
    assert max(s["peak_gib"] for s in r["steps"]) == r["peak_pss_sum_gib"]
    at_peak = r["processes_at_peak"]
    assert any("pipelines.quickstart" in p["process"] for p in at_peak)
    assert abs(sum(p["pss_gib"] for p in at_peak) - r["peak_pss_sum_gib"]) < 0.01 * len(at_peak) + 0.01
    assert (tmp_path / "qs" / "report" / "report.md").is_file() and (tmp_path / "qs.log").is_file()


def test_bench_generation_bf16_reports_logit_errors():
    """In bf16 both models are compared with an fp32 copy, so a disagreement can be told from rounding."""
    r = _run("bench_generation.py", "--dtype", "bfloat16", "--batch", "1")[0]
    err = r["logit_rel_err_vs_fp32"]
    assert r["dtype"] == "bfloat16" and 0 < err["ours"] < 0.05 and 0 < err["hf"] < 0.05
    assert err["ours_argmax_agreement"] > 0.9 and err["hf_argmax_agreement"] > 0.9
