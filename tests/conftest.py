import os
import sys
from pathlib import Path

import pytest

# No network here: make every Hub lookup fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Shared test helpers import by name from every test file: launch_helpers (`accelerate launch` runs),
# fault_launch (injected faults, hostile files), data/data_helpers (awkward images and shards).
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "data"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """An untrained tiny FSQ tokenizer folder (1000 codes, 8×8 tokens at 32 px), shared read-only."""
    from tiny import save_tiny_tokenizer

    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "fsq")
