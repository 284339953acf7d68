"""Stage-1 training.

    accelerate launch -m tokenizers_mm.train --config tokenizers_mm/configs/NAME.yaml [--key value ...]

One linear ``main(cfg)``: setup → train loop → checkpoint → final folder + metrics. Runs as one or
many processes (DDP through accelerate; on CPU ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
--num_processes 2``). Small datasets (the embedded 32 px sets) are held in memory as uint8 and
sharded per rank from a seeded permutation, so the data position is a pure function of the step
and ``--resume`` continues mid-epoch exactly; large datasets stream through
``data.formats.ImageTextDataset``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from tokenizers_mm.checkpoints import (
    atomic_save_dir,
    atomic_write_text,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tokenizers_mm.config_io import ConfigError, check_keys, load_config, to_dict
from tokenizers_mm.discriminator import PatchDiscriminator, hinge_d_loss
from tokenizers_mm.distributed import finish_distributed
from tokenizers_mm.evaluate import evaluate_tokenizer, reconstruction_grid
from tokenizers_mm.hub import push_checkpoint
from tokenizers_mm.metrics import psnr, ssim
from tokenizers_mm.modeling import ImageTokenizer, ImageTokenizerConfig
from tokenizers_mm.presets import PRESETS, preset_config
from tokenizers_mm.train_step import NonfiniteGuard, check_finite_weights, ema_copy, guarded_update


@dataclass
class TrainConfig:
    """Everything a Stage-1 run needs; saved as ``train_config.json`` beside the outputs."""

    preset: str = "fsq-8x8"  # a name from tokenizers_mm.presets.PRESETS
    model: dict[str, Any] = field(default_factory=dict)  # overrides of ImageTokenizerConfig fields
    # embedded sources (shapes|digits|photos) and/or dataset paths (webdataset/HF/image folder), concatenated
    train_data: list[str] = field(default_factory=lambda: ["shapes"])
    train_num: int = 20000  # samples per embedded source (paths are read whole)
    eval_data: str = "shapes"  # held-out evaluation source or path
    eval_num: int = 512
    eval_seed: int = 1_000_003  # embedded eval sets use a seed disjoint from training
    resolution: int = 32
    in_memory: bool = True  # hold the dataset as a uint8 tensor (fast for small images)
    # NHWC activations and weights during training (oneDNN's faster convolutions on CPU, and the layout of
    # tensor-core convolutions on GPU); the final folder and checkpoints hold weights in the usual layout
    channels_last: bool = True
    num_workers: int = 0  # DataLoader workers when streaming
    seed: int = 0
    batch_size: int = 64  # per process, per micro-step
    grad_accum: int = 1
    max_steps: int = 2000  # optimizer steps
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    loss: Literal["l1", "l2", "l1+l2"] = "l2"
    ssim_weight: float = 0.0
    disc_weight: float = 0.0  # PatchGAN hinge loss weight (0 disables the discriminator)
    disc_start: int = 0  # optimizer step at which the GAN loss switches on
    disc_lr: float = 2e-4
    ema_decay: float = 0.0  # EMA of weights (0 disables); the final folder holds the EMA weights
    output_dir: str = "runs/tokenizer"
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: only at the end
    log_every: int = 25
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    allow_pipe: bool = False  # accept `pipe:CMD` dataset URLs (they run CMD in a shell)
    resume: bool = False  # continue from the latest checkpoint in output_dir
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = True
    hub_push_checkpoints: bool = False  # with push_to_hub: also upload each checkpoint (checkpoints/step-N)

    def __post_init__(self) -> None:
        from data.sources import check_source

        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {self.preset!r}")
        for name in (
            "max_nonfinite",
            "batch_size",
            "grad_accum",
            "max_steps",
            "resolution",
            "train_num",
            "eval_num",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "eval_every", "disc_start", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id user/name")
        if self.hub_push_checkpoints and not self.push_to_hub:
            raise ValueError("--hub_push_checkpoints needs --push_to_hub --hub_model_id user/name")
        if self.loss not in ("l1", "l2", "l1+l2"):
            raise ValueError(f"loss must be one of ['l1', 'l2', 'l1+l2'], got {self.loss!r}")
        if not self.train_data:
            raise ValueError("train_data is empty: give at least one source")
        for source in self.train_data:
            check_source(source, self.allow_pipe, "train_data source")
        check_source(self.eval_data, self.allow_pipe, "eval_data")
        # The model overrides are checked here (unknown keys, bad values), not after the data is read.
        check_keys(ImageTokenizerConfig, self.model)
        preset_config(self.preset, resolution=self.resolution, **self.model)


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(recon, target)
    if kind == "l2":
        return F.mse_loss(recon, target)
    return F.l1_loss(recon, target) + F.mse_loss(recon, target)


class StreamingBatches:
    """Batches streamed from dataset paths (webdataset shards, HF folders) through ``ImageTextDataset``.

    Each rank reads its own split of the data (by shard or by sample, see ``data.torch_dataset``) and
    starts its next epoch on its own, so every rank always has a batch and DDP never waits on a rank
    whose split is shorter. On resume the stream is fast-forwarded by the number of batches already
    consumed, which reproduces the data position at the cost of re-reading those batches.
    """

    def __init__(self, sources: list[str], cfg: TrainConfig, rank: int, world: int):
        from data.torch_dataset import ImageTextDataset

        if len(sources) != 1:
            raise ValueError(
                "streaming (in_memory: false) reads exactly one dataset path; merge shards into one"
            )
        self.dataset = ImageTextDataset(
            sources[0],
            cfg.resolution,
            rank=rank,
            world_size=world,
            shuffle=True,
            seed=cfg.seed,
            resample="bicubic",
            allow_pipe=cfg.allow_pipe,
        )
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, drop_last=True
        )
        self.epoch, self.consumed, self._it = 0, 0, None

    def get(self, micro_step: int) -> torch.Tensor:
        while self.consumed <= micro_step:
            batch = self._next()
            self.consumed += 1
        return batch["pixels"]

    def _next(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self.dataset.set_epoch(self.epoch)
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it, self.epoch = None, self.epoch + 1
        raise ValueError("the training data yields no full batch; lower batch_size or add data")


class InMemoryBatches:
    """Rank-sharded batches from a uint8 tensor (N, 3, R, R); batch ``i`` is a pure function of (seed, i)."""

    def __init__(self, images: torch.Tensor, batch_size: int, rank: int, world: int, seed: int):
        self.images, self.batch_size, self.rank, self.world, self.seed = images, batch_size, rank, world, seed
        self.per_rank = len(images) // world
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{len(images)} images cannot fill one batch of {batch_size} on each of {world} processes"
            )
        self._epoch, self._order = -1, None

    def get(self, micro_step: int) -> torch.Tensor:
        epoch, b = divmod(micro_step, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(len(self.images), generator=g)
            self._order = perm[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
            self._epoch = epoch
        idx = self._order[b * self.batch_size : (b + 1) * self.batch_size]
        return self.images[idx].float().div_(127.5).sub_(1.0)  # uint8 (b,3,R,R) → float in [-1, 1]


def _load_images(
    sources: list[str], num: int, resolution: int, seed: int, split: str, allow_pipe: bool = False
) -> torch.Tensor:
    """uint8 (N, 3, R, R) from embedded sources and/or dataset paths; bad samples are counted and skipped."""
    from data.sources import images_tensor

    parts = []
    for source in sources:
        images, skips = images_tensor(source, num, resolution, seed, split, allow_pipe)
        if skips.total:
            print(f"{source}: skipped {skips.total} unreadable samples ({skips.summary()})")
        parts.append(images)
    return torch.cat(parts)


def main(cfg: TrainConfig) -> dict[str, Any]:
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum)
    set_seed(cfg.seed, device_specific=False)
    out_dir = Path(cfg.output_dir)
    model_cfg = preset_config(cfg.preset, resolution=cfg.resolution, **cfg.model)
    model = ImageTokenizer(model_cfg)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    is_main = accelerator.is_main_process
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "train_config.json", json.dumps(to_dict(cfg), indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    accelerator.print(f"tokenizer {cfg.preset}: {n_params / 1e6:.2f}M parameters, {model_cfg.bottleneck}")

    # ---- data
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.in_memory:
        images = _load_images(
            cfg.train_data, cfg.train_num, cfg.resolution, cfg.seed, "train", cfg.allow_pipe
        )
        batches = InMemoryBatches(images, cfg.batch_size, rank, world, cfg.seed)
    else:
        images = None
        batches = StreamingBatches(cfg.train_data, cfg, rank, world)
    eval_images = None
    if is_main:
        eval_images = _load_images(
            [cfg.eval_data], cfg.eval_num, cfg.resolution, cfg.eval_seed, "test", cfg.allow_pipe
        )
    trainable = [p for p in model.parameters() if p.requires_grad]

    # ---- optimisation
    ema = None
    if cfg.ema_decay > 0:
        ema = ema_copy(model, cfg.ema_decay, accelerator.device)
    if not trainable:  # raw patches: nothing to learn
        metrics = _finish(accelerator, cfg, model, ema, eval_images, images, 0, [], {})
        del model
        finish_distributed(accelerator)
        return metrics
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the scaling.
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=cfg.warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_steps * accelerator.num_processes,
        min_lr_rate=cfg.min_lr_ratio,
    )
    disc = d_opt = None
    if cfg.disc_weight > 0:
        disc = PatchDiscriminator(model_cfg.in_channels)
        d_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))
        model, optimizer, scheduler, disc, d_opt = accelerator.prepare(
            model, optimizer, scheduler, disc, d_opt
        )
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, micro, nonfinite_total, history = 0, 0, 0, []
    if cfg.resume and (ckpt := latest_checkpoint(out_dir)) is not None:
        state, extras = load_checkpoint(accelerator, ckpt)
        step, micro = state["step"], state["micro_step"]
        nonfinite_total = state.get("nonfinite_total", 0)
        if ema is not None and "ema" in extras:
            ema.load_state_dict(extras["ema"])
        accelerator.print(f"resumed from {ckpt} at step {step}")
    elif cfg.resume:
        accelerator.print(f"--resume: no checkpoint in {out_dir}/checkpoints, starting fresh")
    if is_main and (out_dir / "log.jsonl").exists() and step == 0:
        (out_dir / "log.jsonl").unlink()

    device = accelerator.device
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not is_main, desc="tokenizer", dynamic_ncols=True)
    t0, last_log = time.time(), {}
    guard = NonfiniteGuard(cfg.max_nonfinite, nonfinite_total)
    model.train()
    while step < cfg.max_steps:
        pixels = batches.get(micro).to(device).contiguous(memory_format=memory_format)  # (b, 3, H, W)
        micro += 1
        gan_on = disc is not None and step >= cfg.disc_start
        with accelerator.accumulate(model):
            out = model(pixels)
            recon = out.reconstruction
            rec_loss = reconstruction_loss(recon, pixels, cfg.loss)
            loss = rec_loss + out.quantizer_loss
            if cfg.ssim_weight > 0:
                loss = loss + cfg.ssim_weight * (1 - ssim(recon, pixels).mean())
            if gan_on:
                d = accelerator.unwrap_model(disc)
                d.requires_grad_(False)
                loss = loss + cfg.disc_weight * (-d(recon).mean())
                d.requires_grad_(True)
            bad = guarded_update(accelerator, loss, trainable, optimizer, scheduler, cfg.grad_clip)
            if gan_on and not bad:
                real_fake = torch.cat([pixels, recon.detach()])  # (2b, 3, H, W): one DDP forward
                logits = disc(real_fake)
                d_loss = hinge_d_loss(*logits.chunk(2))
                accelerator.backward(d_loss)
                d_opt.step()
                d_opt.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        bar.update(1)
        if guard.record(bad, step, accelerator.print):
            continue
        if ema is not None:
            ema.update_parameters(accelerator.unwrap_model(model))
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            with torch.no_grad():
                last_log = {
                    "step": step,
                    "loss": float(loss),
                    "rec_loss": float(rec_loss),
                    "psnr": float(psnr(recon, pixels).mean()),
                    "lr": scheduler.get_last_lr()[0],
                    "elapsed_s": round(time.time() - t0, 1),
                    **{k: float(v) for k, v in (out.metrics or {}).items()},
                }
            if is_main:
                history.append(last_log)
                with open(out_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(last_log) + "\n")
                bar.set_postfix(loss=f"{last_log['loss']:.4f}", psnr=f"{last_log['psnr']:.1f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and is_main and step < cfg.max_steps:
            m = evaluate_tokenizer(_eval_model(accelerator, model, ema), eval_images)
            accelerator.print(f"step {step}: eval psnr {m['psnr']:.2f} ssim {m['ssim']:.4f}")
            model.train()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            extras = {"ema": ema.state_dict()} if ema is not None else None
            state = {"step": step, "micro_step": micro, "nonfinite_total": guard.total}
            check_finite_weights(accelerator, {"model": model, "ema": ema}, f"checkpoint step-{step}")
            ckpt = save_checkpoint(accelerator, out_dir, step, state, extras, keep=cfg.keep_checkpoints)
            if cfg.hub_push_checkpoints and accelerator.is_main_process:
                push_checkpoint(ckpt, cfg.hub_model_id, private=cfg.hub_private)
    bar.close()
    train_time = time.time() - t0
    metrics = _finish(
        accelerator, cfg, model, ema, eval_images, images, train_time, history, {"skipped": guard.total}
    )
    del model, optimizer, scheduler, disc, d_opt  # DDP wrappers before the process group (finish_distributed)
    finish_distributed(accelerator)
    return metrics


def param_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer, in state-dict order (bitwise identity check)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _eval_model(
    accelerator: Accelerator, model: torch.nn.Module, ema: AveragedModel | None
) -> ImageTokenizer:
    m = ema.module if ema is not None else accelerator.unwrap_model(model)
    m.eval()
    return m


def _finish(
    accelerator: Accelerator,
    cfg: TrainConfig,
    model: torch.nn.Module,
    ema: AveragedModel | None,
    eval_images: torch.Tensor | None,
    train_images: torch.Tensor | None,
    train_time: float,
    history: list[dict[str, Any]],
    counters: dict[str, int],
) -> dict[str, Any]:
    """Evaluate, store latent stats, and write the final folder, metrics.json and a reconstruction grid."""
    accelerator.wait_for_everyone()
    check_finite_weights(accelerator, {"model": model, "ema": ema}, "the final folder")
    # Replicas must hold identical weights after DDP training; record every rank's digest to prove it.
    digests = gather_object([param_digest(accelerator.unwrap_model(model))])
    if len(set(digests)) != 1:
        accelerator.print(f"WARNING: parameters differ across processes: {digests}")
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        out_dir = Path(cfg.output_dir)
        final_model = _eval_model(accelerator, model, ema).to(memory_format=torch.contiguous_format)
        if final_model.config.bottleneck == "continuous":
            from tokenizers_mm.continuous import latent_stats

            if train_images is None:  # streaming: estimate the stats on the (held-out) eval images
                train_images = eval_images

            def _latents():
                for i in range(0, min(len(train_images), 4096), 256):
                    x = train_images[i : i + 256].float().div(127.5).sub(1).to(accelerator.device)
                    yield final_model.encode(x).reshape(-1, final_model.config.latent_channels)

            mean, std = latent_stats(_latents())
            final_model.config.latent_mean, final_model.config.latent_std = mean, std
        metrics = evaluate_tokenizer(final_model, eval_images)
        metrics.update(
            train_time_s=round(train_time, 1),
            steps=cfg.max_steps,
            preset=cfg.preset,
            params=sum(p.numel() for p in final_model.parameters()),
            nonfinite_steps_skipped=counters.get("skipped", 0),
            num_processes=accelerator.num_processes,
            rank_param_digests=digests,
        )
        atomic_save_dir(out_dir / "final", lambda d: final_model.save_pretrained(d, safe_serialization=True))
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
        reconstruction_grid(final_model, eval_images[:32]).save(out_dir / "reconstructions.png")
        accelerator.print(
            f"final: psnr {metrics['psnr']:.2f} dB, ssim {metrics['ssim']:.4f}"
            + (f", usage {metrics['codebook_usage']:.1%}" if "codebook_usage" in metrics else "")
            + f" → {out_dir / 'final'}"
        )
        if cfg.push_to_hub:
            final_model.push_to_hub(cfg.hub_model_id, private=cfg.hub_private)
    return metrics


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(
        description="Train a Stage-1 image tokenizer. Any TrainConfig field can be overridden with "
        "--key value "
        "(nested: --model.base_channels 64).",
    )
    parser.add_argument("--config", type=str, default=None, help="YAML file with TrainConfig fields")
    args, rest = parser.parse_known_args(argv)
    try:
        return load_config(TrainConfig, args.config, rest)
    except ConfigError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
    sys.exit(0)
