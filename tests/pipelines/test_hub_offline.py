"""push_to_hub → a (faked) Hub → load by repo id with HF_HUB_OFFLINE=1 in a fresh process: bitwise equal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import pipelines  # noqa: F401  (registers the tasks)
from ar_model.generator import MMGenerator

LOAD_BY_ID = """
import json, sys
import numpy as np
import pipelines
from transformers import pipeline
from ar_model.generator import MMGenerator
repo, out = sys.argv[1], sys.argv[2]
t2i = pipeline("text-to-image", model=repo)
results = t2i("a red circle", num_images_per_prompt=2, generator=0, progress_bar=False)
images = [np.asarray(r["image"]) for r in results]
np.save(out, np.stack(images))
gen = MMGenerator.from_pretrained(repo)
print(json.dumps({"card_steps": gen.card["training"]["steps"], "name": gen.name_or_path}))
"""


def _offline_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(cache),
        HF_HOME=str(cache.parent / "hf_home"),
        OMP_NUM_THREADS="1",
    )
    return env


def test_push_then_load_by_repo_id_offline_is_bitwise_identical(model_dir, tmp_path, fake_hub):
    cache, hub = fake_hub.cache, fake_hub
    gen = MMGenerator.from_pretrained(model_dir)
    info = gen.push_to_hub("user/tiny-mmgen", private=True)
    assert info.oid and (cache / "models--user--tiny-mmgen" / "refs" / "main").read_text() == info.oid
    [(repo, _, paths)] = hub.commits
    assert repo == "user/tiny-mmgen"
    expected = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file())
    assert paths == expected
    assert {"README.md", "samples.png", "model.safetensors", "image_tokenizer/model.safetensors"} <= set(
        paths
    )

    original = (
        gen.text_to_image(["a red circle"], num_images_per_prompt=2, seed=0).permute(0, 2, 3, 1).numpy()
    )
    out = tmp_path / "images.npy"
    run = subprocess.run(
        [sys.executable, "-c", LOAD_BY_ID, "user/tiny-mmgen", str(out)],
        env=_offline_env(cache),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded == {"card_steps": 30, "name": "user/tiny-mmgen"}
    assert np.array_equal(np.load(out), original)


def test_an_unknown_repo_id_offline_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(OSError, match="neither a local folder nor a Hub model repo"):
        MMGenerator.from_pretrained("user/does-not-exist", cache_dir=tmp_path)


def test_the_trainer_pushes_each_checkpoint_and_its_final_folder(tmp_path, fake_hub, model_dir):
    """``--push_to_hub --hub_model_id --hub_push_checkpoints`` on the Stage-2 trainer: the step-1
    checkpoint goes to checkpoints/step-1, then final/ as the repo's root, one commit each."""
    from ar_model.train import TrainConfig, main

    hub = fake_hub
    tokenizer = model_dir / "image_tokenizer"
    cfg = TrainConfig(
        tokenizer=str(tokenizer),
        preset="tiny",
        model={"hidden_size": 32, "num_layers": 1, "num_heads": 2},
        train_data=["shapes"],
        train_num=32,
        max_len=256,
        tokens_per_batch=512,
        max_steps=2,
        warmup_steps=1,
        eval_every=0,
        save_every=1,
        num_sample_prompts=0,
        output_dir=str(tmp_path / "run"),
        push_to_hub=True,
        hub_model_id="user/pushed",
        hub_push_checkpoints=True,
    )
    main(cfg)
    [(_, ckpt_message, ckpt_paths), (repo, message, paths)] = hub.commits
    ckpt = tmp_path / "run" / "checkpoints" / "step-1"
    assert ckpt_message == f"checkpoint {ckpt.name}"
    assert ckpt_paths == sorted(
        f"checkpoints/step-1/{p.relative_to(ckpt).as_posix()}" for p in ckpt.rglob("*") if p.is_file()
    )
    assert repo == "user/pushed" and "step 2" in message
    assert {"config.json", "model.safetensors", "text_tokenizer.model", "mm_generator.json"} <= set(paths)
    repo_dir = tmp_path / "hub" / "models--user--pushed"
    head = (repo_dir / "refs" / "main").read_text().strip()  # the final push (the checkpoint's is older)
    MMGenerator.from_pretrained(repo_dir / "snapshots" / head)  # a complete, loadable folder


def test_a_stage1_tokenizer_round_trips_through_the_hub(fake_hub, make_tokenizer, tmp_path):
    """The Stage-1 trainer's push (transformers' own push_to_hub) and loading it back by repo id."""
    import torch

    from tokenizers_mm import ImageTokenizer

    tok = ImageTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok", seed=3))
    tok.push_to_hub("user/tok", private=True)
    [(repo, _, paths)] = fake_hub.commits
    assert repo == "user/tok" and {"config.json", "model.safetensors"} <= set(paths)
    again = ImageTokenizer.from_pretrained("user/tok", cache_dir=fake_hub.cache, local_files_only=True)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(tok.encode(pixels), again.encode(pixels))


def test_the_stage1_trainer_pushes_its_final_folder(fake_hub, tmp_path):
    from tiny import TINY_TOKENIZER

    from tokenizers_mm.train import TrainConfig, main

    cfg = TrainConfig(
        preset="fsq-8x8", model=dict(TINY_TOKENIZER), train_num=32, eval_num=8, batch_size=8, max_steps=2,
        warmup_steps=1, save_every=1, output_dir=str(tmp_path / "tok"), push_to_hub=True,
        hub_model_id="user/tok-run", hub_push_checkpoints=True,
    )  # fmt: skip
    main(cfg)
    assert [c[0] for c in fake_hub.commits] == ["user/tok-run", "user/tok-run"]
    assert all(p.startswith("checkpoints/step-1/") for p in fake_hub.commits[0][2])
    assert {"config.json", "model.safetensors"} <= set(fake_hub.commits[1][2])
