"""Sampling from :class:`ar_model.modeling.MMDecoderForCausalLM` with a KV cache (issue 3 "Generation").

Independent of transformers' ``generate``: prompts are left-padded to one batch, every row keeps its
own 2-D positions (padding gets position 0 and is masked out as a key through ``attention_mask``),
and a :class:`~ar_model.attention.KVCache` holds the keys and values of every layer.

* :func:`generate_tokens`: text continuation (greedy, temperature, top-k, top-p).
* :func:`generate_image_codes`: appends ``<boi> <h> <w>`` to each prompt and samples exactly
  ``h * w`` codes, only from the image-code range, with batched classifier-free guidance.

Positions of generated tokens follow the model's position rule: the whole sequence's segment list
is known before sampling starts (text continues 1-D; an image's ``h`` and ``w`` are fixed by its size
tokens), so :func:`ar_model.positions.multimodal_positions` gives every position up front.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ar_model.attention import AttentionPlan, KVCache, plan_attention
from ar_model.code_groups import ungroup_codes
from ar_model.positions import Segment, multimodal_positions
from ar_model.rope import rope_tables

CFG_SCHEDULES: tuple[str, ...] = ("constant", "linear")

__all__ = [
    "CFG_SCHEDULES",
    "KVCache",
    "generate_image_codes",
    "generate_tokens",
    "guidance_scale_at",
    "left_pad",
    "sample_logits",
    "sample_rows",
]


# ----------------------------------------------------------------------------- sampling
def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One id per row from ``logits (b, V)``; ``temperature=0`` is greedy (argmax).

    top-k keeps the k largest logits; top-p (nucleus sampling, Holtzman et al. 2019,
    arXiv:1904.09751) keeps the smallest set of ids whose probability mass reaches p (at least one).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # (b, V)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (b, V)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (b, V)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this id already reaches p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)  # (b, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (b,)


Generators = torch.Generator | Sequence[torch.Generator] | None


def sample_rows(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: Generators,
) -> torch.Tensor:
    """:func:`sample_logits` with one generator for the batch, or one per row (a list of ``b``).

    Per-row generators make a row's draws independent of the rows batched with it, so a batch
    samples exactly what each row would sample alone.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return sample_logits(logits, temperature, top_k, top_p, generator)
    if len(generator) != logits.shape[0]:
        raise ValueError(f"got {len(generator)} generators for {logits.shape[0]} rows")
    rows = [sample_logits(logits[i : i + 1], temperature, top_k, top_p, g) for i, g in enumerate(generator)]
    return torch.cat(rows)  # (b,)


def guidance_scale_at(scale: float, schedule: str, step: int, total: int) -> float:
    """Guidance scale for token ``step`` of ``total``: constant, or linear from 1 up to ``scale``."""
    if schedule == "constant":
        return scale
    if schedule == "linear":  # weak guidance early, full at the last token
        return 1.0 + (scale - 1.0) * (step + 1) / total
    raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")


# ----------------------------------------------------------------------------- batching
def left_pad(
    ids: Sequence[torch.Tensor], positions: Sequence[torch.Tensor], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad rows ``(n_i,)`` / ``(n_i, 2)`` to ``ids (b, n)``, ``positions (b, n, 2)``, ``mask (b, n)``.

    Padding has id ``pad_id``, position ``(0, 0)`` and mask False; real tokens keep their own positions.
    """
    if len(ids) != len(positions) or not ids:
        raise ValueError("need one positions tensor per prompt, and at least one prompt")
    n = max(t.shape[0] for t in ids)
    device = ids[0].device
    out_ids = torch.full((len(ids), n), pad_id, dtype=torch.long, device=device)
    out_pos = torch.zeros(len(ids), n, 2, dtype=torch.float32, device=device)
    mask = torch.zeros(len(ids), n, dtype=torch.bool, device=device)
    for r, (t, p) in enumerate(zip(ids, positions)):
        if p.shape != (t.shape[0], 2):
            raise ValueError(f"prompt {r}: positions {tuple(p.shape)} do not match ids {tuple(t.shape)}")
        k = t.shape[0]
        if k:
            out_ids[r, n - k :] = t
            out_pos[r, n - k :] = p.to(device=device, dtype=torch.float32)
            mask[r, n - k :] = True
    return out_ids, out_pos, mask


class _Stepper:
    """Runs the model on a left-padded batch that grows by one token per row and step.

    With a KV cache (the default) every position of the whole sequence is known up front, so the RoPE
    tables of all of them are computed once, the cache is allocated at its final size, and each step
    runs :meth:`~ar_model.modeling.MMDecoderModel.run_layers` on one token per row with a prebuilt
    attention plan (no mask at all without left padding) and, when the layers are plain modules, as
    :func:`~ar_model.modeling.lean_layer` calls on their weights. Without a cache, every step reruns
    the model on the whole sequence (the reference the tests compare with). Either way only the
    logits of the vocabulary slice ``[start, stop)`` that will be sampled are computed.
    """

    def __init__(
        self,
        model,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        new_positions: torch.Tensor,
        vocab_range: tuple[int, int],
        use_cache: bool,
        latents: torch.Tensor | None = None,
        latent_mask: torch.Tensor | None = None,
        code_groups: torch.Tensor | None = None,
    ):
        cfg = model.config
        self.model, self.decoder, self.use_cache = model, model.model, use_cache
        self.ids, self.positions = ids, positions  # (b, n), (b, n, 2)
        # Continuous tokens of the prompt (b, n, D) where latent_mask (b, n) is set; each step may add one.
        self.latents, self.latent_mask = latents, latent_mask
        # Grouped codes of the prompt (b, n, G) at its placeholder ids; each step may add one group.
        self.code_groups = code_groups
        b, n = ids.shape
        self.length = n  # tokens per row so far
        self.start, self.stop = vocab_range
        # The head's rows of the sampled slice, transposed once to (c, k): for a few rows, x @ W^T with a
        # contiguous (c, k) matrix runs up to 2x faster on CPU than F.linear with the (k, c) weight.
        self.head_t = None
        if model._plain_lm_head():
            self.head_t = model.lm_head.weight[self.start : self.stop].t().contiguous()  # (c, k)
        padded = not bool(mask.all())
        # Key mask of every position (prompt padding False, generated tokens True), or None.
        self.key_mask = torch.cat([mask, mask.new_ones(b, new_positions.shape[1])], dim=1) if padded else None
        self.cache: KVCache | None = None
        if use_cache:
            w = self.decoder.embed_tokens.weight
            all_pos = torch.cat([positions, new_positions.to(positions)], dim=1)  # (b, m, 2), m = n + new
            # RoPE tables of every position, each (b, m, 1, d); the cache at its final length m.
            self.cos, self.sin = rope_tables(all_pos, cfg.head_dim, cfg.rope_base, w.dtype)
            shape = (cfg.num_layers, b, cfg.num_kv_heads, cfg.head_dim, all_pos.shape[1])
            self.cache = KVCache(*shape, dtype=w.dtype, device=w.device)
            self.step_plan = AttentionPlan(kind="cached")  # one new token sees every cached key
            self.weights = self.decoder.plain_layer_weights()  # None: run the modules (adapters, hooks)

    def prefill(self) -> torch.Tensor:
        """Logits ``(b, stop - start)`` after the prompt."""
        return self._logits(self.prefill_hidden())

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Append ``token (b,)`` at ``position (b, 2)``; logits ``(b, stop - start)`` for the next token."""
        return self._logits(self.step_hidden(token, position))

    def prefill_hidden(self) -> torch.Tensor:
        """Last hidden state ``(b, c)`` after the prompt (the diffusion head's condition)."""
        n = self.length
        if not self.use_cache:
            return self._uncached()
        mask = self.key_mask[:, :n] if self.key_mask is not None else None
        plan = plan_attention(
            self.model.config.attn_impl,
            self.ids.shape[0],
            n,
            self.ids.device,
            attention_mask=mask,
            cached=True,
        )
        hidden = self.decoder.run_layers(
            self.ids,
            self.cos[:, :n],
            self.sin[:, :n],
            plan,
            self.cache,
            self.weights,
            latents=self.latents,
            latent_mask=self.latent_mask,
            code_groups=self.code_groups,
        )
        return hidden[:, -1]

    def step_hidden(
        self,
        token: torch.Tensor,
        position: torch.Tensor,
        latent: torch.Tensor | None = None,
        code_group: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append ``token (b,)`` (with its continuous ``latent (b, D)`` or its grouped codes ``code_group
        (b, G)`` if given) at ``position (b, 2)``; returns the new last hidden state ``(b, c)``."""
        p = self.length
        self.length += 1
        groups = code_group[:, None, :] if code_group is not None else None  # (b, 1, G)
        latents = latent_mask = None
        if latent is not None:
            latents = latent[:, None, :]  # (b, 1, D)
            latent_mask = torch.ones(latent.shape[0], 1, dtype=torch.bool, device=latent.device)
        if not self.use_cache:
            self.ids = torch.cat([self.ids, token[:, None]], dim=1)  # (b, n + 1)
            self.positions = torch.cat([self.positions, position[:, None]], dim=1)  # (b, n + 1, 2)
            if latent is not None or self.latents is not None:
                b, d = token.shape[0], (latent if latent is not None else self.latents).shape[-1]
                old = self.latents if self.latents is not None else torch.zeros(b, p, d, device=token.device)
                old_mask = (
                    self.latent_mask
                    if self.latent_mask is not None
                    else old.new_zeros(b, p, dtype=torch.bool)
                )
                new = latents if latents is not None else old.new_zeros(b, 1, d)
                new_mask = latent_mask if latent_mask is not None else old_mask.new_zeros(b, 1)
                self.latents = torch.cat([old, new.to(old)], dim=1)  # (b, n + 1, D)
                self.latent_mask = torch.cat([old_mask, new_mask], dim=1)  # (b, n + 1)
            if groups is not None or self.code_groups is not None:  # keep code_groups aligned with ids
                ref = groups if groups is not None else self.code_groups
                b, g = token.shape[0], ref.shape[-1]
                old = (
                    self.code_groups if self.code_groups is not None else ref.new_zeros(b, p, g)
                )  # (b, n, G)
                new = groups if groups is not None else ref.new_zeros(b, 1, g)  # (b, 1, G)
                self.code_groups = torch.cat([old, new], dim=1)  # (b, n + 1, G)
            return self._uncached()
        plan = self.step_plan
        if self.key_mask is not None:  # the new token's query sees the real keys: (b, 1, 1, p + 1)
            plan = AttentionPlan(kind="cached", mask=self.key_mask[:, None, None, : p + 1])
        hidden = self.decoder.run_layers(
            token[:, None],
            self.cos[:, p : p + 1],
            self.sin[:, p : p + 1],
            plan,
            self.cache,
            self.weights,
            latents=latents,
            latent_mask=latent_mask,
            code_groups=groups,
        )
        return hidden[:, -1]

    def _uncached(self) -> torch.Tensor:
        mask = self.key_mask[:, : self.length] if self.key_mask is not None else None
        kwargs = {}
        if self.latents is not None:
            kwargs = {"latents": self.latents, "latent_mask": self.latent_mask}
        if self.code_groups is not None:
            kwargs["code_groups"] = self.code_groups
        out = self.decoder(self.ids, positions=self.positions, attention_mask=mask, **kwargs)
        return out.last_hidden_state[:, -1]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(b, c)`` -> logits of the sampled vocabulary slice ``(b, stop - start)``."""
        if self.head_t is not None:
            return hidden @ self.head_t  # (b, c) @ (c, k)
        return self.model.lm_head(hidden)[:, self.start : self.stop]


def _as_rows(prompts: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise ValueError(f"prompt ids must be (b, n) or a list of (n_i,), got {tuple(prompts.shape)}")
        return list(prompts)
    return [torch.as_tensor(p, dtype=torch.long) for p in prompts]


def _inference(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run a sampling loop under :func:`torch.inference_mode` and return a normal tensor.

    Inference mode drops autograd's view tracking and version counters, which no_grad keeps: 1-9% of the
    generation time on CPU (README, Stage 2, "Speed"). Its tensors may not be saved for backward later, so
    the result is cloned outside it: callers can train on generated tokens.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> torch.Tensor:
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return out.clone()

    return wrapper


# ----------------------------------------------------------------------------- text
@_inference
def generate_tokens(
    model,
    prompt_ids: torch.Tensor | Sequence[torch.Tensor],
    prompt_positions: torch.Tensor | Sequence[torch.Tensor] | None,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    allowed_range: tuple[int, int] | None = None,
    use_cache: bool = True,
    prompt_latents: torch.Tensor | None = None,
    prompt_latent_mask: torch.Tensor | None = None,
    prompt_code_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Continue each prompt with up to ``max_new_tokens`` text tokens; returns ``(b, max_new_tokens)``.

    Prompts are ``(b, n)`` or a list of ``(n_i,)`` (left-padded here), with positions ``(b, n, 2)`` /
    ``(n_i, 2)`` (None: text-only 1-D positions). A prompt ends with a text token (e.g. ``<eoi>`` after an
    image), so generated token ``t`` sits at the prompt's last position ``+ 1 + t`` on both axes, which is
    what :func:`~ar_model.positions.multimodal_positions` gives for a trailing text segment. Prompts
    that hold continuous images give ``prompt_latents (b, n, D)`` and ``prompt_latent_mask (b, n)``
    (equal-length rows; the ids there are the placeholder ``config.latent_token_id``); prompts that hold
    grouped codes give ``prompt_code_groups (b, n, G)`` (equal-length rows, read at
    ``config.group_token_id``). After
    ``eos_id`` (default ``config.eos_id``) a row emits ``pad_id``; generation stops when every row has.
    Only ids in ``allowed_range = [start, stop)`` are sampled (default: the text ids
    ``[0, config.text_vocab_size)``, so captions never contain image codes).
    """
    cfg = model.config
    rows = _as_rows(prompt_ids)
    if prompt_positions is None:
        pos_rows = [multimodal_positions([("text", r.shape[0])], "flat", device=r.device) for r in rows]
    elif isinstance(prompt_positions, torch.Tensor):
        pos_rows = list(prompt_positions[None] if prompt_positions.dim() == 2 else prompt_positions)
    else:
        pos_rows = list(prompt_positions)
    if any(r.shape[0] == 0 for r in rows):
        raise ValueError("every prompt needs at least one token (e.g. <bos>)")
    ids, positions, mask = left_pad(rows, pos_rows, cfg.pad_id)
    b, n = ids.shape
    if prompt_latents is not None:
        if not bool(mask.all()) or prompt_latent_mask is None or prompt_latent_mask.shape != (b, n):
            raise ValueError("prompt_latents need equal-length prompts and a prompt_latent_mask (b, n)")
        if prompt_latents.shape[:2] != (b, n):
            raise ValueError(
                f"prompt_latents must be (b, n, D) = ({b}, {n}, D), got {tuple(prompt_latents.shape)}"
            )
    if prompt_code_groups is not None and (not bool(mask.all()) or prompt_code_groups.shape[:2] != (b, n)):
        raise ValueError(
            f"prompt_code_groups need equal-length prompts and shape (b, n, G) = ({b}, {n}, G), got "
            f"{tuple(prompt_code_groups.shape)}"
        )
    if n + max_new_tokens > cfg.max_position:
        raise ValueError(f"{n} prompt + {max_new_tokens} new tokens exceed max_position={cfg.max_position}")
    eos_id = cfg.eos_id if eos_id is None else eos_id
    start, stop = (0, cfg.text_vocab_size) if allowed_range is None else allowed_range
    if not 0 <= start < stop <= cfg.vocab_size:
        raise ValueError(f"allowed_range must be within [0, {cfg.vocab_size}), got {allowed_range}")
    # Generated token t of a row sits at its last prompt position + 1 + t on both axes: (b, max_new, 2).
    steps = torch.arange(1, max_new_tokens + 1, device=ids.device, dtype=positions.dtype)  # (max_new,)
    new_positions = positions[:, -1:, :] + steps[None, :, None]
    stepper = _Stepper(
        model,
        ids,
        positions,
        mask,
        new_positions,
        (start, stop),
        use_cache,
        prompt_latents,
        prompt_latent_mask,
        prompt_code_groups,
    )
    logits = stepper.prefill()  # (b, stop - start)
    out = torch.full((b, max_new_tokens), cfg.pad_id, dtype=torch.long, device=ids.device)
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    pad = torch.full_like(done, cfg.pad_id, dtype=torch.long)  # (b,)
    for t in range(max_new_tokens):
        token = sample_logits(logits, temperature, top_k, top_p, generator) + start  # (b,)
        token = torch.where(done, pad, token)
        out[:, t] = token
        done |= token == eos_id
        if t + 1 == max_new_tokens or bool(done.all()):
            break
        logits = stepper.step(token, new_positions[:, t])
    return out


# ----------------------------------------------------------------------------- images
def _image_rows(
    rows: list[torch.Tensor], segments: Sequence[Sequence[Segment]] | None, h: int, w: int, cfg, scheme: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prompt ids + ``<boi> <h> <w>`` per row, and positions of the prompt, size tokens *and* the image."""
    suffix = [cfg.boi_id, cfg.h_token(h), cfg.w_token(w)]
    ids, positions = [], []
    for r, row in enumerate(rows):
        segs = list(segments[r]) if segments is not None else [("text", row.shape[0])]
        full = [*segs, ("text", len(suffix)), ("image", (h, w))]
        pos = multimodal_positions(full, scheme, device=row.device)  # (n_i + 3 + h*w, 2)
        if pos.shape[0] != row.shape[0] + len(suffix) + h * w:
            raise ValueError(
                f"prompt {r}: its segments cover {pos.shape[0] - 3 - h * w} tokens, not {row.shape[0]}"
            )
        ids.append(torch.cat([row.to(torch.long), torch.tensor(suffix, dtype=torch.long, device=row.device)]))
        positions.append(pos)
    return ids, positions


@_inference
def generate_image_codes(
    model,
    prompts: torch.Tensor | Sequence[torch.Tensor],
    h: int,
    w: int,
    *,
    guidance_scale: float = 1.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: Generators = None,
    prompt_segments: Sequence[Sequence[Segment]] | None = None,
    uncond_prompt: torch.Tensor | None = None,
    use_cfg: bool | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Sample an ``h × w`` grid of image codes after each prompt; returns LongTensor ``(b, h, w)``.

    ``prompts``: token ids per row, e.g. ``<bos> caption`` (``(b, n)`` or a list of ``(n_i,)``; rows of
    different lengths are left-padded). ``prompt_segments`` gives each prompt's ``("text", n)`` /
    ``("image", (h, w))`` list when a prompt holds images (default: text only). ``<boi> <h> <w>`` is
    appended, then exactly ``h * w`` codes are sampled in raster order from the image-code logits only
    (every id outside ``config.image_code_range`` is excluded).

    Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598): the cond rows and as many uncond
    rows (``uncond_prompt``, default ``<bos>`` = the empty caption) run in one batch, and codes are
    sampled from ``l_u + s (l_c - l_u)``, computed as ``l_c + (s - 1)(l_c - l_u)`` so that ``s = 1``
    gives ``l_c`` exactly. ``cfg_schedule="linear"`` ramps ``s`` from 1 up to ``guidance_scale`` over
    the image (:func:`guidance_scale_at`). ``use_cfg`` (default: ``guidance_scale != 1``) runs the
    uncond rows; without them no guidance is applied. ``generator``: one for the batch or one per
    prompt (:func:`sample_rows`). ``progress`` shows a tqdm bar over the ``h * w`` sampling steps.

    Grouped-code models (``config.code_group = g > 1``) generate ``(h/g) × (w/g)`` positions (the size
    tokens say so); at each position they draw the ``g²`` codes of its block one after the other from
    :class:`~ar_model.code_groups.CodeGroupHead`, each guided and sampled as above; the result is
    ungrouped to ``(b, h, w)``.
    """
    cfg = model.config
    rows = _as_rows(prompts)
    if any(r.shape[0] == 0 for r in rows):
        raise ValueError("every prompt needs at least one token (e.g. <bos>)")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
    g = cfg.code_group
    if h % g or w % g:
        raise ValueError(f"a {h}x{w} code grid does not split into the model's {g}x{g} code groups")
    h, w = h // g, w // g  # image positions (the code grid itself when g = 1)
    b, hw = len(rows), h * w
    ids, positions = _image_rows(rows, prompt_segments, h, w, cfg, cfg.rope_scheme)
    guided = guidance_scale != 1.0 if use_cfg is None else use_cfg
    if guided:
        uncond = torch.tensor([cfg.bos_id]) if uncond_prompt is None else torch.as_tensor(uncond_prompt)
        u_ids, u_pos = _image_rows([uncond.to(rows[0].device)] * b, None, h, w, cfg, cfg.rope_scheme)
        ids, positions = ids + u_ids, positions + u_pos
    prompt_len = [t.shape[0] for t in ids]
    prompt_pos = [p[: len(t)] for p, t in zip(positions, ids)]
    image_pos = torch.stack([p[len(t) :] for p, t in zip(positions, ids)])  # (rows, h*w, 2)
    batch_ids, batch_pos, mask = left_pad(ids, prompt_pos, cfg.pad_id)
    if batch_ids.shape[1] + hw > cfg.max_position:
        raise ValueError(
            f"{max(prompt_len)} prompt + {hw} image tokens exceed max_position={cfg.max_position}"
        )
    if g > 1:
        stepper = _Stepper(model, batch_ids, batch_pos, mask, image_pos, (0, 1), use_cache)
        sampling = (guided, guidance_scale, cfg_schedule, temperature, top_k, top_p, generator)
        groups = _sample_code_groups(model, stepper, image_pos, b, sampling, progress)  # (b, h*w, G)
        return ungroup_codes(groups.view(b, h, w, g * g), g)  # (b, h, w, G) -> (b, h*g, w*g)
    start, stop = cfg.image_code_range
    stepper = _Stepper(model, batch_ids, batch_pos, mask, image_pos, (start, stop), use_cache)
    logits = stepper.prefill()  # (rows, num_image_codes): the only ids allowed
    codes = torch.empty(b, hw, dtype=torch.long, device=batch_ids.device)
    for t in tqdm(range(hw), desc="image tokens", disable=not progress, leave=False):
        code_logits = logits.float()  # (rows, num_image_codes)
        if guided:
            cond, uncond = code_logits[:b], code_logits[b:]  # each (b, num_image_codes)
            scale = guidance_scale_at(guidance_scale, cfg_schedule, t, hw)
            code_logits = cond + (scale - 1.0) * (cond - uncond)
        codes[:, t] = sample_rows(code_logits, temperature, top_k, top_p, generator)
        if t + 1 == hw:
            break  # the last code needs no forward pass
        token = codes[:, t] + start  # (b,) ids in the shared vocabulary
        if guided:
            token = torch.cat([token, token])  # the uncond rows continue with the same codes: (2b,)
        logits = stepper.step(token, image_pos[:, t])
    return codes.view(b, h, w)  # (b, h*w) -> (b, h, w), raster order


def _sample_code_groups(
    model, stepper: _Stepper, image_pos: torch.Tensor, b: int, sampling: tuple, progress: bool
) -> torch.Tensor:
    """The grouped-code loop of :func:`generate_image_codes`: ``(b, h*w, G)`` codes, one position per
    trunk step, its ``G`` codes drawn slot by slot by the code-group head (guided per slot)."""
    guided, guidance_scale, cfg_schedule, temperature, top_k, top_p, generator = sampling
    cfg, head = model.config, model.group_head
    hw, num_slots = image_pos.shape[1], cfg.codes_per_group
    hidden = stepper.prefill_hidden()  # (rows, c): the condition of position 0
    device = hidden.device
    groups = torch.empty(b, hw, num_slots, dtype=torch.long, device=device)
    placeholder = torch.full((hidden.shape[0],), cfg.group_token_id, dtype=torch.long, device=device)
    for t in tqdm(range(hw), desc="image tokens", disable=not progress, leave=False):
        scale = guidance_scale_at(guidance_scale, cfg_schedule, t, hw) if guided else 1.0
        for slot in range(num_slots):
            drawn = groups[:, t, :slot]  # (b, slot)
            prefix = torch.cat([drawn, drawn]) if guided else drawn  # the uncond rows follow the same codes
            logits = head.slot_logits(hidden, prefix).float()  # (rows, K)
            if guided:
                cond, uncond = logits[:b], logits[b:]  # each (b, K)
                logits = cond + (scale - 1.0) * (cond - uncond)
            groups[:, t, slot] = sample_rows(logits, temperature, top_k, top_p, generator)  # (b,)
        if t + 1 == hw:
            break  # the last position needs no forward pass
        fed = torch.cat([groups[:, t], groups[:, t]]) if guided else groups[:, t]  # (rows, G)
        hidden = stepper.step_hidden(placeholder, image_pos[:, t], code_group=fed)
    return groups
