"""Every command-line entry rejects impossible arguments before doing any work, saying what is allowed.

Each case runs the entry in-process through its argv (``main(argv)`` for the data CLIs,
``main(parse_args(argv))`` for the trainers), expects exit status 2 with the message on stderr, and
checks that nothing was written.
"""

from __future__ import annotations

import re

import pytest

import ar_model.train as ar_train
import data.build
import data.extract_codes
import tokenizers_mm.train as tok_train
from tokenizers_mm import ImageTokenizer

OUT = "{out}"  # replaced by a fresh path that must still be absent afterwards


def _trainer(module):
    return lambda argv: module.main(module.parse_args(argv))


STAGE1 = ["--output_dir", OUT]
STAGE2 = ["--tokenizer", "{tok}", "--output_dir", OUT]
BUILD = ["--dataset", "shapes", "--num", "8", "--out", OUT]
EXTRACT = ["--tokenizer", "{tok}", "--dataset", "shapes", "--num", "8", "--resolution", "32", "--out", OUT]

PIPE = "'pipe:' URL, which runs a shell command; pass --allow_pipe"
UNKNOWN = "unknown {} 'nowhere': choose one of shapes, digits, photos or the path of a dataset"
CASES = [
    # (entry, base argv, extra argv, expected message (regex))
    ("stage1", STAGE1, ["--max_steps", "0"], "max_steps must be ≥ 1, got 0"),
    ("stage1", STAGE1, ["--batch_size", "-4"], "batch_size must be ≥ 1, got -4"),
    ("stage1", STAGE1, ["--resolution", "-32"], "resolution must be ≥ 1, got -32"),
    ("stage1", STAGE1, ["--lr", "0"], "lr must be > 0, got 0"),
    ("stage1", STAGE1, ["--preset", "fsq-9x9"], r"preset must be one of \['fsq-8x8', 'vq-8x8'"),
    ("stage1", STAGE1, ["--loss", "l3"], r"loss: 'l3' is not one of \['l1', 'l2', 'l1\+l2'\]"),
    ("stage1", STAGE1, ["--no_such", "1"], r"unknown config key\(s\) \['no_such'\]; allowed: \['preset'"),
    ("stage1", STAGE1, ["--model.no_such", "1"],
     r"unknown ImageTokenizerConfig key\(s\) \['model.no_such'\]; allowed: \['model.bottleneck'"),
    ("stage1", STAGE1, ["--train_data", "[]"], "train_data is empty"),
    ("stage1", STAGE1, ["--train_data", "[nowhere]"], UNKNOWN.format("train_data source")),
    ("stage1", STAGE1, ["--eval_data", "nowhere"], UNKNOWN.format("eval_data")),
    ("stage1", STAGE1, ["--train_data", "[pipe:cat x.tar]"], PIPE),
    ("stage2", STAGE2, ["--max_steps", "0"], "max_steps must be ≥ 1, got 0"),
    ("stage2", STAGE2, ["--max_len", "-1"], "max_len must be ≥ 1, got -1"),
    ("stage2", STAGE2, ["--tokens_per_batch", "8", "--max_len", "16"], "tokens_per_batch=8 must be ≥"),
    ("stage2", STAGE2, ["--t2i_fraction", "1.5"], r"t2i_fraction must be in \[0, 1\], got 1.5"),
    ("stage2", STAGE2, ["--preset", "huge"], r"preset must be one of \['tiny', 'small', 'base'\]"),
    ("stage2", STAGE2, ["--no_such", "1"], r"unknown config key\(s\) \['no_such'\]; allowed: \['tokenizer'"),
    ("stage2", STAGE2, ["--model.no_such", "1"],
     r"unknown MMDecoderConfig key\(s\) \['model.no_such'\]; allowed: \[.*'model.hidden_size'"),
    ("stage2", STAGE2, ["--model.hidden_size", "30"], "hidden_size=30 is not divisible by num_heads"),
    ("stage2", STAGE2, ["--text_model_type", "wordpiece"], "text_model_type must be 'bpe' or 'unigram'"),
    ("stage2", STAGE2, ["--train_data", "[shapes, nowhere]"], UNKNOWN.format("train_data source")),
    ("stage2", STAGE2, ["--val_data", "[pipe:cat x.tar]"], PIPE),
    ("stage2", STAGE2, ["--codes_data", "[{tmp}]"], "is not a codes directory .no codes_meta.json."),
    ("stage2", ["--output_dir", OUT], ["--tokenizer", "{tmp}"], "is not a saved Stage-1 tokenizer folder"),
    ("stage2", ["--output_dir", OUT], [], r"--tokenizer DIR .* is required"),
    ("build", BUILD, ["--num", "-5"], "--num must be >= 1, got -5"),
    ("build", BUILD, ["--resolution", "4"], "--resolution must be between 8 and 1024, got 4"),
    ("build", BUILD, ["--shard_size", "0"], "--shard_size must be >= 1, got 0"),
    ("build", BUILD, ["--dataset", "nowhere"], "unknown dataset 'nowhere': choose one of shapes, dig"),
    ("build", BUILD, ["--format", "zip"], r"invalid choice: 'zip' \(choose from '?webdataset'?, '?hf'?\)"),
    ("extract", EXTRACT, ["--num", "0"], "--num must be >= 1, got 0"),
    ("extract", EXTRACT, ["--batch_size", "-1"], "--batch_size must be >= 1, got -1"),
    ("extract", EXTRACT, ["--resolution", "30"], "not a multiple of the tokenizer's downsampling factor 4"),
    ("extract", EXTRACT, ["--dataset", "nowhere"], UNKNOWN.format("dataset")),
    ("extract", EXTRACT, ["--dataset", "pipe:cat x.tar"], PIPE),
    ("extract", EXTRACT, ["--tokenizer", "{tmp}"], "has no config.json"),
    ("extract", EXTRACT, ["--split", "val"], r"invalid choice: 'val' \(choose from '?train'?, '?test'?\)"),
]  # fmt: skip
ENTRIES = {
    "stage1": _trainer(tok_train),
    "stage2": _trainer(ar_train),
    "build": data.build.main,
    "extract": data.extract_codes.main,
}


@pytest.mark.parametrize("entry, base, extra, message", CASES, ids=[f"{c[0]}{c[2]}" for c in CASES])
def test_impossible_arguments_fail_before_any_work(
    entry, base, extra, message, tokenizer_dir, tmp_path, capsys
):
    out = tmp_path / "out"
    values = {"out": str(out), "tok": str(tokenizer_dir), "tmp": str(tmp_path)}
    argv = [a.format(**values) for a in [*base, *extra]]
    try:
        code = ENTRIES[entry](argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not out.exists()  # no work was done


def test_pipe_urls_work_only_with_the_explicit_flag(tokenizer_dir, tmp_path, capsys):
    from data.codes import load_codes

    data.build.main(["--dataset", "shapes", "--num", "8", "--out", str(tmp_path / "wds"), "--no_progress"])
    url = f"pipe:cat {tmp_path / 'wds' / 'shard-000000.tar'}"
    argv = ["--tokenizer", str(tokenizer_dir), "--dataset", url, "--num", "8", "--resolution", "32"]
    argv += ["--out", str(tmp_path / "codes"), "--no_progress"]
    assert data.extract_codes.main(argv) == 2
    assert "--allow_pipe" in capsys.readouterr().err
    assert data.extract_codes.main([*argv, "--allow_pipe"]) == 0
    assert len(load_codes(tmp_path / "codes", expect=ImageTokenizer.from_pretrained(tokenizer_dir))) == 8
    for module in (tok_train, ar_train):
        cfg = module.parse_args(["--tokenizer", str(tokenizer_dir)] * (module is ar_train) + [
            "--train_data", f"[{url}]", "--allow_pipe", "true"
        ])  # fmt: skip
        assert cfg.train_data == [url] and cfg.allow_pipe
