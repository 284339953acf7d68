import os
import sys
from pathlib import Path

# No network here: make every Hub lookup fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Shared test helpers import by name from every test file: launch_helpers (`accelerate launch` runs),
# fault_launch (injected faults, hostile files), data/data_helpers (awkward images and shards).
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "data"))
