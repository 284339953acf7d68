"""What every benchmark script ends with: its result as one JSON line on stdout, and in ``--out``."""

from __future__ import annotations

import json
from pathlib import Path


def emit_json(results: dict[str, object], out: Path | None) -> None:
    """Print ``results`` as one JSON line (what CI and the README tables read) and write it to ``out``."""
    line = json.dumps(results)
    print(line)
    if out:
        out.write_text(line + "\n")
