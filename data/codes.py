"""Pre-extracted image tokens on disk, tied to the tokenizer that made them.

A codes directory (written by ``python -m data.extract_codes``) holds webdataset shards
``codes-000000.tar``, … with per sample ``KEY.codes.npy`` (discrete indices (h, w), int16 or
int32) or ``KEY.latents.npy`` (continuous tokens (h, w, c), float32) and ``KEY.txt`` (UTF-8
caption), plus ``codes_meta.json``: the tokenizer identity (``tokenizers_mm.identity``), count,
grid, dtype, kind and the extraction arguments. The directory is written into a temporary folder
beside it and renamed when complete, so a crash never leaves half a codes directory.

``load_codes(path, expect=tokenizer)`` refuses codes made by another tokenizer
(``CodesMismatchError``): training on them would be garbage. Nothing here unpickles: arrays are
read with ``allow_pickle=False`` after their header is checked, and object arrays are refused.
Corrupt samples are skipped and counted by reason and key.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from data.readers import iter_tar_records
from data.skips import SkipCounter

if TYPE_CHECKING:
    from tokenizers_mm.modeling import ImageTokenizer

LOGGER = logging.getLogger("data")
META_FILE = "codes_meta.json"
SHARD_PATTERN = "codes-%06d.tar"
FORMAT_VERSION = 1
KINDS = {"codes": "codes.npy", "latents": "latents.npy"}  # kind → per-sample file extension
INT16_MAX = 32767
# Identity fields that must agree between the codes and the tokenizer they are used with.
CHECKED_FIELDS = ("bottleneck", "codebook_size", "latent_channels", "grid")


class CodesMismatchError(ValueError):
    """The codes were extracted with a different tokenizer (or grid) than the one expected."""


@dataclass(frozen=True)
class CodesData:
    """Loaded codes: tokens (N, h, w) long or (N, h, w, c) float32, with their captions and keys."""

    tokens: torch.Tensor
    captions: list[str]
    keys: list[str]
    meta: dict[str, Any]
    skips: SkipCounter

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def identity(self) -> dict[str, Any]:
        """The identity of the tokenizer that made these codes."""
        return self.meta["identity"]


def codes_dtype(codebook_size: int) -> np.dtype:
    """Smallest signed storage for indices in [0, codebook_size): int16, else int32."""
    return np.dtype(np.int16) if codebook_size <= INT16_MAX else np.dtype(np.int32)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _check_key(key: str) -> str:
    # webdataset splits "key.ext" at the first dot of the file name; readers drop "." and "__" names
    key = key.replace(".", "_")
    name = key.rpartition("/")[2]
    if not name or name.startswith("__") or key.startswith("/"):
        raise ValueError(f"invalid sample key {key!r}: must be non-empty, not start with '__' or '/'")
    return key


def _check_tokens(tokens: torch.Tensor, identity: Mapping[str, Any]) -> tuple[str, np.ndarray]:
    """Validate ``tokens`` against ``identity``; return (kind, numpy array in its storage dtype)."""
    missing = [k for k in ("fingerprint", "grid", "codebook_size") if k not in identity]
    if missing:
        raise ValueError(f"identity lacks {missing}; make it with tokenizers_mm.tokenizer_identity(model)")
    grid = list(identity["grid"])
    codebook_size = identity.get("codebook_size")
    if codebook_size is not None:
        integer = not (tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool)
        if tokens.ndim != 3 or not integer:
            raise ValueError(
                f"discrete codes must be an integer tensor (N, h, w), got {tokens.dtype} "
                f"{tuple(tokens.shape)}"
            )
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= codebook_size:
            raise ValueError(f"code indices must lie in [0, {codebook_size}), got [{low}, {high}]")
        kind, array = "codes", tokens.cpu().numpy().astype(codes_dtype(codebook_size))
    else:
        channels = identity.get("latent_channels")
        if tokens.ndim != 4 or not tokens.is_floating_point() or tokens.shape[-1] != channels:
            raise ValueError(
                f"continuous tokens must be a float tensor (N, h, w, {channels}), "
                f"got {tokens.dtype} {tuple(tokens.shape)}"
            )
        kind, array = "latents", tokens.detach().float().cpu().numpy()
        if not np.isfinite(array).all():
            raise ValueError("continuous tokens contain NaN or inf")
    if list(tokens.shape[1:3]) != grid:
        raise ValueError(f"tokens have grid {list(tokens.shape[1:3])} but the tokenizer identity says {grid}")
    return kind, array


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Raise FileExistsError unless ``out_dir`` is absent, empty, or (with ``overwrite``) earlier codes."""
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file")
    if any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
            )
        if not (out / META_FILE).is_file():
            raise FileExistsError(
                f"refusing to overwrite {out}: it does not look like a codes directory (no {META_FILE}); "
                "remove it yourself or choose another output"
            )


def write_codes(
    out_dir: str | os.PathLike,
    keys: Sequence[str],
    captions: Sequence[str],
    tokens: torch.Tensor,
    identity: Mapping[str, Any],
    shard_size: int = 10000,
    extra_meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write tokens (N, h, w) int or (N, h, w, c) float with captions and keys as a codes directory.

    ``identity`` is ``tokenizers_mm.identity.tokenizer_identity(model, resolution)`` of the model
    that made ``tokens``. ``out_dir`` must be absent or empty, or (with ``overwrite``) hold earlier
    codes, which are replaced. Returns ``out_dir``.
    """
    import webdataset as wds

    from tokenizers_mm.checkpoints import atomic_save_dir
    from tokenizers_mm.identity import package_version

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not len(keys) == len(captions) == len(tokens):
        raise ValueError(
            f"need one key and caption per sample, got {len(keys)} keys, {len(captions)} captions, "
            f"{len(tokens)} samples"
        )
    if len(tokens) == 0:
        raise ValueError("no samples to write")
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    kind, array = _check_tokens(tokens, identity)
    clean_keys = [_check_key(str(k)) for k in keys]
    if len(set(clean_keys)) != len(clean_keys):
        dupes = sorted(k for k, n in Counter(clean_keys).items() if n > 1)[:5]
        raise ValueError(f"duplicate sample keys (after replacing '.' by '_'): {dupes}")
    ext = KINDS[kind]

    def write(tmp: Path) -> None:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the codes are meant to be shared
        writer = wds.ShardWriter(
            str(tmp / SHARD_PATTERN), maxcount=shard_size, verbose=0, encoder=False, mtime=0
        )
        try:
            for key, caption, sample in zip(clean_keys, captions, array):
                writer.write({"__key__": key, ext: _npy_bytes(sample), "txt": str(caption).encode("utf-8")})
        finally:
            writer.close()
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "count": len(clean_keys),
            "grid": list(array.shape[1:3]),
            "token_shape": list(array.shape[1:]),
            "dtype": array.dtype.name,
            "shards": sorted(p.name for p in tmp.glob("codes-*.tar")),
            "shard_size": shard_size,
            "identity": dict(identity),
            "extra_meta": dict(extra_meta or {}),
            "created_by": f"mmgen-toolkit {package_version()} (data.codes)",
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")

    return atomic_save_dir(out, write)


def read_codes_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The validated ``codes_meta.json`` of a codes directory (ValueError saying what is wrong)."""
    meta_path = Path(path) / META_FILE
    hint = "a codes directory is made by `python -m data.extract_codes`"
    if not meta_path.is_file():
        raise ValueError(f"{path} is not a codes directory: {META_FILE} is missing ({hint})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path} is not valid JSON ({err}); re-run the extraction ({hint})") from err
    required = ("format_version", "kind", "count", "grid", "token_shape", "dtype", "shards", "identity")
    missing = [k for k in required if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks {missing}; re-run the extraction ({hint})")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has format_version {meta['format_version']}; this version reads {FORMAT_VERSION}"
        )
    if meta["kind"] not in KINDS or not isinstance(meta["identity"], dict):
        raise ValueError(f"{meta_path}: kind must be one of {list(KINDS)} and identity a JSON object")
    if "fingerprint" not in meta["identity"]:
        raise ValueError(f"{meta_path}: the tokenizer identity has no fingerprint ({hint})")
    count, shards, grid, shape = meta["count"], meta["shards"], meta["grid"], meta["token_shape"]
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"{meta_path}: count must be a non-negative integer, got {count!r}")
    if not isinstance(shards, list) or not all(isinstance(s, str) and Path(s).name == s for s in shards):
        raise ValueError(f"{meta_path}: shards must be a list of file names in the directory, got {shards!r}")
    ndim = 2 if meta["kind"] == "codes" else 3
    valid_shape = isinstance(shape, list) and len(shape) == ndim and all(isinstance(n, int) for n in shape)
    if not valid_shape or grid != shape[:2] or min(shape) < 1:
        raise ValueError(
            f"{meta_path}: token_shape {shape!r} does not fit grid {grid!r} and kind {meta['kind']}"
        )
    try:
        dtype = np.dtype(meta["dtype"])
    except TypeError as err:
        raise ValueError(f"{meta_path}: unknown dtype {meta['dtype']!r}") from err
    allowed = ("int16", "int32") if meta["kind"] == "codes" else ("float32",)
    if dtype.name not in allowed:
        raise ValueError(f"{meta_path}: dtype of {meta['kind']} must be one of {allowed}, got {dtype.name}")
    return meta


def check_identity(found: Mapping[str, Any], expected: Mapping[str, Any], where: str = "the codes") -> None:
    """Raise CodesMismatchError unless ``found`` (stored identity) matches ``expected``.

    The fingerprint must be equal; of the other checked fields, those present in ``expected``.
    """
    fix = (
        f"re-run `python -m data.extract_codes --tokenizer {expected.get('name_or_path') or 'DIR'} ...` "
        "to extract codes with the tokenizer you are using"
    )
    if found.get("fingerprint") != expected.get("fingerprint"):
        raise CodesMismatchError(
            f"{where} were extracted with tokenizer {found.get('name_or_path')!r} "
            f"(fingerprint {found.get('fingerprint')}), but tokenizer {expected.get('name_or_path')!r} "
            f"(fingerprint {expected.get('fingerprint')}) was expected; {fix}"
        )
    for field in CHECKED_FIELDS:
        if field in expected and found.get(field) != expected[field]:
            raise CodesMismatchError(
                f"{where} have {field}={found.get(field)!r} but {expected[field]!r} was expected "
                f"(tokenizer {expected.get('name_or_path')!r}); {fix}"
            )


class _BadSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_NPY_MAGIC = b"\x93NUMPY"


def _npy_header_length(raw: bytes) -> int:
    """Bytes before the data of a .npy: magic, version, header-length field and the header itself."""
    if raw[:6] != _NPY_MAGIC or len(raw) < 10:
        raise _BadSample("bad_npy", "not a .npy file (bad magic string)")
    version = (raw[6], raw[7])
    if version == (1, 0):
        return 10 + int.from_bytes(raw[8:10], "little")
    if version == (2, 0) and len(raw) >= 12:
        return 12 + int.from_bytes(raw[8:12], "little")
    raise _BadSample("bad_npy", f"unsupported .npy version {version}")


def _parse_npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a complete .npy header (parsed as a literal: no pickles)."""
    stream = io.BytesIO(header)
    try:
        npy = np.lib.format
        version = npy.read_magic(stream)
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read(stream)
    except (ValueError, EOFError, OSError, SyntaxError) as err:
        raise _BadSample("bad_npy", str(err)) from None
    if stream.tell() != len(header):
        raise _BadSample("bad_npy", "header length does not match its header")
    return tuple(shape), bool(fortran), dtype


def _read_npy(
    raw: bytes, dtype: np.dtype, shape: tuple[int, ...], headers: dict[bytes, tuple] | None = None
) -> np.ndarray:
    """Parse one .npy (header first: no pickles, no object arrays), check dtype and shape, and view its data.

    ``headers`` caches parsed headers by their bytes: the samples of one codes directory share one
    header, so parsing it once instead of per sample makes loading ~2x faster.
    """
    offset = _npy_header_length(raw)
    header = raw[:offset]
    parsed = headers.get(header) if headers is not None else None
    if parsed is None:
        parsed = _parse_npy_header(header)
        if headers is not None and len(headers) < 64:
            headers[header] = parsed
    found_shape, fortran, found_dtype = parsed
    if found_dtype.hasobject:
        raise _BadSample("object_dtype", f"dtype {found_dtype} holds Python objects; not unpickled")
    if found_dtype != dtype:
        raise _BadSample("bad_dtype", f"dtype {found_dtype}, expected {dtype}")
    if found_shape != shape:
        raise _BadSample("bad_shape", f"shape {found_shape}, expected {shape}")
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - offset != count * dtype.itemsize:
        raise _BadSample("bad_npy", f"{len(raw) - offset} data bytes, expected {count * dtype.itemsize}")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    if fortran:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


def _decode_record(
    files: Mapping[str, bytes],
    meta: Mapping[str, Any],
    dtype: np.dtype,
    shape: tuple[int, ...],
    headers: dict[bytes, tuple] | None = None,
) -> tuple[np.ndarray, str]:
    """One record → (tokens array, caption), or raise _BadSample."""
    ext = KINDS[meta["kind"]]
    if ext not in files:
        raise _BadSample(f"missing_{meta['kind']}", f"files: {sorted(files)}")
    if "txt" not in files:
        raise _BadSample("missing_caption", f"files: {sorted(files)}")
    array = _read_npy(files[ext], dtype, shape, headers)
    codebook_size = meta["identity"].get("codebook_size")
    if meta["kind"] == "codes" and codebook_size is not None and array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= codebook_size:
            raise _BadSample("bad_code", f"indices in [{low}, {high}], codebook size {codebook_size}")
    if meta["kind"] == "latents" and not np.isfinite(array).all():
        raise _BadSample("not_finite", "latents contain NaN or inf")
    try:
        caption = files["txt"].decode("utf-8")
    except UnicodeDecodeError as err:
        raise _BadSample("caption_utf8", str(err)) from None
    return array, caption


def load_codes(
    path: str | os.PathLike, expect: ImageTokenizer | Mapping[str, Any] | None = None
) -> CodesData:
    """Load a codes directory, checking it was made by ``expect`` (a tokenizer or its identity).

    Raises ValueError for a missing or invalid ``codes_meta.json`` and ``CodesMismatchError`` when
    ``expect`` is given and its identity differs. Corrupt samples are skipped and counted in
    ``skips`` (``bad_npy``, ``object_dtype``, ``bad_dtype``, ``bad_shape``, ``bad_code``,
    ``not_finite``, ``caption_utf8``, ``missing_*``, ``duplicate_key``, ``bad_shard``).
    """
    root = Path(path)
    meta = read_codes_meta(root)
    if expect is not None:
        if isinstance(expect, Mapping):
            expected = expect
        else:
            from tokenizers_mm.identity import tokenizer_identity

            try:
                expected = tokenizer_identity(expect, meta["identity"].get("resolution"))
            except (TypeError, ValueError):  # a grid it cannot make: the fingerprints differ anyway
                expected = tokenizer_identity(expect)
        check_identity(meta["identity"], expected, where=f"the codes in {root}")
    dtype = np.dtype(meta["dtype"])
    shape = tuple(int(n) for n in meta["token_shape"])
    counter = SkipCounter()
    arrays: list[np.ndarray] = []
    captions: list[str] = []
    keys: list[str] = []
    seen: set[str] = set()
    records, count = 0, meta["count"]
    headers: dict[bytes, tuple] = {}
    for shard in meta["shards"]:
        for key, files in iter_tar_records(str(root / shard), counter):
            records += 1
            if key in seen:
                counter.skip(key, "duplicate_key", shard)
                continue
            try:
                array, caption = _decode_record(files, meta, dtype, shape, headers)
            except _BadSample as bad:
                counter.skip(key, bad.reason, f"{shard}: {bad.detail}")
                continue
            seen.add(key)
            arrays.append(array)
            captions.append(caption)
            keys.append(key)
    if records < count:
        LOGGER.warning("%s: found %d of %d samples (missing or truncated shards)", root, records, count)
    counter.log_summary(LOGGER)
    stacked = np.stack(arrays) if arrays else np.zeros((0, *shape), dtype=dtype)  # (N, h, w[, c])
    tokens = torch.from_numpy(stacked)
    tokens = tokens.long() if meta["kind"] == "codes" else tokens.float()
    return CodesData(tokens, captions, keys, meta, counter)
