"""The main job end to end at smoke scale: every step runs, the report has every section, and a
second run skips the finished steps."""

import json

from pipelines.quickstart import main


def test_quickstart_smoke_runs_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "qs"
    report = main(["--out", str(out), "--preset", "smoke", "--model.base_channels", "8"])
    text = report.read_text()
    for section in ("## Stage 1: image tokenizer", "### Reconstructions", "### Training curves", "## Config"):
        assert section in text
    for name in ("shapes", "digits", "photos"):
        assert (out / "report" / f"recon_{name}.png").is_file()
        assert f"| {name} |" in text
    assert (out / "report" / "tokenizer_loss.png").is_file()
    assert (out / "tokenizer" / "final" / "model.safetensors").is_file()
    metrics = json.loads((out / "eval" / "tokenizer_metrics.json").read_text())
    assert set(metrics) == {"shapes", "digits", "photos"} and all("psnr" in m for m in metrics.values())
    last = capsys.readouterr().out.strip().splitlines()[-2:]
    assert last[0].startswith("tokenizer:") and last[1].startswith("report:")

    main(["--out", str(out), "--preset", "smoke"])
    second = capsys.readouterr().out
    assert "data: done, skipping" in second and "tokenizer: done, skipping" in second
