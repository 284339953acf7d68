from dataclasses import dataclass, field
from typing import Literal

import pytest

from tokenizers_mm.config_io import ConfigError, load_config, parse_overrides


@dataclass
class Inner:
    width: int = 4


@dataclass
class Cfg:
    lr: float = 1e-3
    steps: int = 10
    levels: list[int] = field(default_factory=lambda: [8, 5])
    loss: Literal["l1", "l2"] = "l2"
    name: str | None = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("steps must be ≥ 1")


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.01\nlevels: [7, 5, 5]\ninner:\n  width: 8\n")
    cfg = load_config(
        Cfg, p, ["--steps", "20", "--flag", "--inner.width=16", "--extra.a", "3", "--loss", "l1"]
    )
    assert cfg.lr == 0.01 and cfg.steps == 20 and cfg.flag is True and cfg.levels == [7, 5, 5]
    assert cfg.inner.width == 16 and cfg.extra == {"a": 3} and cfg.loss == "l1"


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--stepz", "3"], "unknown config key"),
        (["--inner.height", "3"], "inner.height"),
        (["--steps", "2.5"], "integer"),
        (["--loss", "l3"], "not one of"),
        (["--steps", "0"], "steps must be"),
        (["--flag", "maybe"], "true/false"),
    ],
)
def test_bad_keys_and_values_are_errors(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(Cfg, None, argv)


def test_parse_overrides_rejects_positional():
    with pytest.raises(ConfigError):
        parse_overrides(["steps", "3"])


CONFIG_DIR = __import__("pathlib").Path(__file__).resolve().parents[2] / "tokenizers_mm" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_tokenizer_config_builds(path):
    """Each shipped Stage-1 config parses into a TrainConfig whose model overrides build a tokenizer."""
    from tokenizers_mm.presets import preset_config
    from tokenizers_mm.train import TrainConfig

    # The GPU config names a placeholder shard path the user replaces on the command line.
    placeholder = "/path/to/" in path.read_text()
    cfg = load_config(TrainConfig, path, ["--train_data", "[shapes]"] if placeholder else [])
    model = preset_config(cfg.preset, **cfg.model)
    assert cfg.max_steps > 0 and model.resolution == cfg.resolution
