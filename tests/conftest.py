import os
import sys
from pathlib import Path

# No network here: make every Hub lookup fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Shared test helpers (launch_helpers: `accelerate launch` runs) import by name from every test file.
sys.path.insert(0, str(Path(__file__).parent))
