"""Who made these tokens: a tokenizer's identity, stored beside pre-extracted codes and checked at load.

The fingerprint is a sha256 over the canonical JSON of the config (without the keys that
transformers rewrites on every save/load, e.g. ``transformers_version``, ``_name_or_path``) and
over every ``state_dict`` tensor's name, dtype, shape and bytes, in sorted-name order. So it is
stable across ``save_pretrained``/``from_pretrained`` and changes when any weight, buffer (a VQ
codebook) or config field (FSQ levels, latent statistics) changes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from tokenizers_mm.modeling import ImageTokenizer

FORMAT_VERSION = 1
DISTRIBUTION = "mmgen_toolkit"
# Written or rewritten by transformers itself, or runtime switches that do not change the tokens.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "name_or_path",
        "architectures",
        "dtype",
        "torch_dtype",
        "_commit_hash",
        "_attn_implementation_autoset",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


def package_version() -> str:
    """Installed version of this toolkit, or "unknown" (e.g. run from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw bytes of a tensor of any dtype (bfloat16 included: numpy cannot hold it, uint8 can)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
    return flat.view(torch.uint8).numpy().tobytes()


# Config keys added after fingerprint format 1, with the value that reproduces the behaviour from
# before they existed. At that value they are left out of the hash, so tokenizers, codes and model
# folders saved before the key existed keep their identity; any other value counts.
ADDED_CONFIG_KEYS: dict[str, Any] = {"fsq_entropy_mode": "channel"}


def _canonical_config(model: ImageTokenizer) -> dict[str, Any]:
    return {
        k: v
        for k, v in model.config.to_dict().items()
        if k not in VOLATILE_CONFIG_KEYS and not (k in ADDED_CONFIG_KEYS and v == ADDED_CONFIG_KEYS[k])
    }


def tokenizer_fingerprint(model: ImageTokenizer) -> str:
    """sha256 hex of the canonical config and all state_dict tensors (see the module docstring)."""
    config = _canonical_config(model)
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        data = _tensor_bytes(tensor)
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape), len(data)], separators=(",", ":"))
        digest.update(header.encode("utf-8"))
        digest.update(data)
    return digest.hexdigest()


def tokenizer_identity(model: ImageTokenizer, resolution: int | None = None) -> dict[str, Any]:
    """JSON-friendly identity of ``model``: fingerprint, what its tokens look like, where it came from.

    ``resolution`` (default: the one it was trained at) sets ``grid``, the (h, w) tokens per image;
    any multiple of the downsampling factor is allowed. ``latent_channels`` is the channels of one
    float token (continuous and patches), None for discrete tokenizers; ``codebook_size`` is None
    for continuous ones.
    """
    config = model.config
    resolution = config.resolution if resolution is None else int(resolution)
    grid = list(model.token_grid(resolution, resolution))
    return {
        "fingerprint": tokenizer_fingerprint(model),
        "bottleneck": config.bottleneck,
        "codebook_size": config.codebook_size,
        "latent_channels": None if config.is_discrete else config.token_dim,
        "resolution": resolution,
        "grid": grid,
        "name_or_path": str(config.name_or_path or ""),
        "package_version": package_version(),
        "format_version": FORMAT_VERSION,
    }
