"""2-D positions for interleaved text and image tokens (DESIGN §2, "Multimodal RoPE").

Every token gets a position ``(p0, p1)``; :mod:`ar_model.rope` rotates even frequency pairs by
``p0`` and odd pairs by ``p1``. Axis convention, for every scheme:

* axis 0 is the image **row** (height, ``i``), axis 1 is the image **column** (width, ``j``);
* a text token at 1-D position ``n`` sits at ``(n, n)``, so text-only sequences are plain RoPE.

A document is a list of segments, ``("text", n_tokens)`` or ``("image", (h, w))``. An image
segment covers exactly ``h * w`` tokens in raster order (row-major: token ``r * w + c`` is row
``r``, column ``c``); the special tokens around it (``<boi> <h> <w>`` and ``<eoi>``) are ordinary
text segments that the caller supplies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

SCHEMES: tuple[str, ...] = ("rope_tv", "mrope", "flat")

Segment = tuple[str, int] | tuple[str, tuple[int, int]]


def _check_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def parse_segment(segment: Segment) -> tuple[str, int, int]:
    """Validate one segment; return ``(kind, a, b)``: ``("text", n, 0)`` or ``("image", h, w)``."""
    if not isinstance(segment, tuple | list) or len(segment) != 2:
        raise ValueError(f"a segment is ('text', n) or ('image', (h, w)), got {segment!r}")
    kind, size = segment
    if kind == "text":
        return "text", _check_int(size, "text segment length", 0), 0
    if kind == "image":
        if not isinstance(size, tuple | list) or len(size) != 2:
            raise ValueError(f"an image segment is ('image', (h, w)), got {segment!r}")
        return "image", _check_int(size[0], "image height h", 1), _check_int(size[1], "image width w", 1)
    raise ValueError(f"segment kind must be 'text' or 'image', got {kind!r}")


def num_tokens(segments: Iterable[Segment]) -> int:
    """Number of tokens the segments cover (an image counts ``h * w``)."""
    total = 0
    for seg in segments:
        kind, a, b = parse_segment(seg)
        total += a if kind == "text" else a * b
    return total


def _image_grid(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Raster-order ``(h*w, 2)`` grid from row coordinates ``(h,)`` and column coordinates ``(w,)``."""
    h, w = rows.numel(), cols.numel()
    return torch.stack(
        [rows.repeat_interleave(w), cols.repeat(h)],  # each (h*w,): row-major raster order
        dim=-1,
    )  # (h*w, 2)


def multimodal_positions(
    segments: Sequence[Segment],
    scheme: str = "rope_tv",
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Positions ``(n_tokens, 2)`` (axis 0 = row, axis 1 = column) of one document's tokens.

    Let ``L`` be the 1-D position of the token before an image (``L = -1`` when the image is the
    first segment, as if text had started at 0). Text token ``n`` is at ``(n, n)``; then:

    * ``rope_tv`` (Su, "闭门造车之多模态思路浅谈(三):位置编码", https://kexue.fm/archives/10352):
      patch ``(i, j)``, ``i = 1..h`` (row), ``j = 1..w`` (column) is at
      ``(L + (w*h - h)/2 + i, L + (w*h - w)/2 + j)``, which centres the grid on the ``w*h`` slots
      the image occupies; the next text token is at ``L + w*h + 1``. Half-integers occur.
    * ``mrope`` (Qwen2-VL, Wang et al. 2024, arXiv:2409.12191): patch ``(i', j')`` from 0 is at
      ``(L + 1 + i', L + 1 + j')``; the next text token is at max(positions so far) + 1, i.e.
      ``L + 1 + max(h, w)``.
    * ``flat``: token ``k`` of the flattened sequence is at ``(k, k)``.

    Computed per segment with ``arange``; no Python loop over tokens.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown position scheme {scheme!r}; choose one of {SCHEMES}")
    # Work in float64 (exact for half-integers far beyond any sequence length), cast at the end.
    f64 = {"dtype": torch.float64, "device": device}
    parts: list[torch.Tensor] = []
    nxt = 0.0  # 1-D position of the next text token; the previous token is at L = nxt - 1
    for seg in segments:
        kind, a, b = parse_segment(seg)
        if kind == "text":
            p = torch.arange(a, **f64) + nxt  # (a,)
            parts.append(torch.stack([p, p], dim=-1))  # (a, 2)
            nxt += a
            continue
        h, w = a, b
        last = nxt - 1.0  # L
        if scheme == "rope_tv":
            rows = last + (w * h - h) / 2 + torch.arange(1, h + 1, **f64)  # (h,)
            cols = last + (w * h - w) / 2 + torch.arange(1, w + 1, **f64)  # (w,)
            parts.append(_image_grid(rows, cols))
            nxt = last + w * h + 1
        elif scheme == "mrope":
            rows = last + 1 + torch.arange(h, **f64)  # (h,)
            cols = last + 1 + torch.arange(w, **f64)  # (w,)
            parts.append(_image_grid(rows, cols))
            # Every position so far is <= L < L + max(h, w), the image's largest coordinate.
            nxt = last + 1 + max(h, w)
        else:  # flat
            p = torch.arange(h * w, **f64) + nxt  # (h*w,)
            parts.append(torch.stack([p, p], dim=-1))  # (h*w, 2)
            nxt += h * w
    if not parts:
        return torch.zeros(0, 2, dtype=dtype, device=device)
    return torch.cat(parts, dim=0).to(dtype)  # (n_tokens, 2)


def document_positions(
    documents: Sequence[Sequence[Segment]],
    scheme: str = "rope_tv",
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Positions of several documents laid end to end ``(sum n_tokens, 2)``, restarting at 0 per document."""
    parts = [multimodal_positions(doc, scheme, dtype=dtype, device=device) for doc in documents]
    if not parts:
        return torch.zeros(0, 2, dtype=dtype, device=device)
    return torch.cat(parts, dim=0)  # (sum n_tokens, 2)
