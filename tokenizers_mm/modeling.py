"""``ImageTokenizer``: a transformers ``PreTrainedModel`` wrapping encoder → bottleneck → decoder.

One autoencoder family with swappable bottlenecks (DESIGN §1): ``fsq`` and ``vq`` give discrete
tokens (b, h, w); ``continuous`` and ``patches`` give float tokens (b, h, w, c). Registered with
``AutoConfig``/``AutoModel`` on import, so ``AutoModel.from_pretrained(DIR)`` works without
``trust_remote_code``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from tokenizers_mm.autoencoder import Decoder, Encoder
from tokenizers_mm.continuous import ContinuousBottleneck, denormalize_latents, normalize_latents
from tokenizers_mm.fsq import FSQ
from tokenizers_mm.patches import RawPatches, patchify, unpatchify
from tokenizers_mm.vq import VectorQuantizer

BOTTLENECKS = ("fsq", "vq", "continuous", "patches")
# Keys that transformers itself writes into every config.json; everything else must be ours.
_base = PretrainedConfig()
_BASE_CONFIG_KEYS = frozenset(
    set(_base.to_dict())
    | {k.lstrip("_") for k in vars(_base)}
    | set(vars(_base))
    | {
        "transformers_version",
        "architectures",
        "name_or_path",
        "return_unused_kwargs",
        "dtype",
        "torch_dtype",
    }
)
del _base


class ImageTokenizerConfig(PretrainedConfig):
    """Configuration of an :class:`ImageTokenizer`. Unknown keys raise instead of being ignored.

    Args:
        bottleneck: "fsq" | "vq" | "continuous" | "patches".
        base_channels, channel_mult, num_res_blocks, mid_blocks, norm_groups: the conv autoencoder
            (downsampling factor ``2**(len(channel_mult)-1)``; ignored by "patches").
        fsq_levels: FSQ levels per channel (codebook size = their product).
        fsq_entropy_weight: weight of FSQ's entropy penalty (raises codebook usage; 0 = off).
        fsq_entropy_mode: "channel" (per-channel levels, :func:`~tokenizers_mm.fsq.fsq_entropy_loss`) or
            "joint" (whole codes, :func:`~tokenizers_mm.fsq.fsq_joint_entropy_loss`).
        vq_*: VectorQuantizer options (codebook size, code dim, gradient "ste"|"rotation", distance,
            EMA, decay, commitment beta, k-means init, dead-code restart after N unused steps).
        latent_channels, continuous_kind, kl_weight, noise_std: the continuous bottleneck.
        latent_mean, latent_std: per-channel statistics of the latents on the training set (set by
            training); Stage 2 always sees ``(latent - mean) / std``.
        patch_size: tokens of the raw-patch tokenizer are p×p×3 pixels.
        resolution: the image size the tokenizer was trained at (any multiple of the factor works).
    """

    model_type = "mm_image_tokenizer"

    def __init__(
        self,
        bottleneck: str = "fsq",
        in_channels: int = 3,
        resolution: int = 32,
        base_channels: int = 32,
        channel_mult: list[int] | None = None,
        num_res_blocks: int = 1,
        mid_blocks: int = 1,
        norm_groups: int = 8,
        fsq_levels: list[int] | None = None,
        fsq_entropy_weight: float = 0.0,
        fsq_entropy_mode: str = "channel",
        vq_codebook_size: int = 1024,
        vq_dim: int = 8,
        vq_gradient: str = "rotation",
        vq_distance: str = "l2",
        vq_ema: bool = True,
        vq_decay: float = 0.99,
        vq_beta: float = 0.25,
        vq_kmeans_init: bool = True,
        vq_dead_code_steps: int = 100,
        latent_channels: int = 4,
        continuous_kind: str = "kl",
        kl_weight: float = 1e-6,
        noise_std: float = 0.1,
        latent_mean: list[float] | None = None,
        latent_std: list[float] | None = None,
        patch_size: int = 4,
        **kwargs: Any,
    ):
        unknown = sorted(set(kwargs) - _BASE_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"ImageTokenizerConfig: unknown key(s) {unknown}")
        if bottleneck not in BOTTLENECKS:
            raise ValueError(f"bottleneck must be one of {BOTTLENECKS}, got {bottleneck!r}")
        self.bottleneck = bottleneck
        self.in_channels = in_channels
        self.resolution = resolution
        self.base_channels = base_channels
        self.channel_mult = list(channel_mult) if channel_mult is not None else [1, 2, 4]
        self.num_res_blocks = num_res_blocks
        self.mid_blocks = mid_blocks
        self.norm_groups = norm_groups
        self.fsq_levels = list(fsq_levels) if fsq_levels is not None else [8, 5, 5, 5]
        self.fsq_entropy_weight = fsq_entropy_weight
        self.fsq_entropy_mode = fsq_entropy_mode
        self.vq_codebook_size = vq_codebook_size
        self.vq_dim = vq_dim
        self.vq_gradient = vq_gradient
        self.vq_distance = vq_distance
        self.vq_ema = vq_ema
        self.vq_decay = vq_decay
        self.vq_beta = vq_beta
        self.vq_kmeans_init = vq_kmeans_init
        self.vq_dead_code_steps = vq_dead_code_steps
        self.latent_channels = latent_channels
        self.continuous_kind = continuous_kind
        self.kl_weight = kl_weight
        self.noise_std = noise_std
        self.latent_mean = latent_mean
        self.latent_std = latent_std
        self.patch_size = patch_size
        for name in ("base_channels", "num_res_blocks", "patch_size", "resolution", "latent_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(
                f"channel_mult must be a non-empty list of positive ints, got {self.channel_mult}"
            )
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution {self.resolution} is not a multiple of the downsampling factor "
                f"{self.downsample_factor}"
            )
        super().__init__(**kwargs)

    @property
    def downsample_factor(self) -> int:
        """Pixels per token along each side."""
        if self.bottleneck == "patches":
            return self.patch_size
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def is_discrete(self) -> bool:
        return self.bottleneck in ("fsq", "vq")

    @property
    def codebook_size(self) -> int | None:
        if self.bottleneck == "fsq":
            n = 1
            for level in self.fsq_levels:
                n *= level
            return n
        if self.bottleneck == "vq":
            return self.vq_codebook_size
        return None

    @property
    def token_dim(self) -> int:
        """Channels of one token: the code dim for discrete tokenizers, the latent dim otherwise."""
        return {
            "fsq": len(self.fsq_levels),
            "vq": self.vq_dim,
            "continuous": self.latent_channels,
            "patches": self.patch_size * self.patch_size * self.in_channels,
        }[self.bottleneck]


@dataclass
class ImageTokenizerOutput(ModelOutput):
    """reconstruction (b, 3, H, W); tokens (b, h, w) or (b, h, w, c); quantizer_loss scalar."""

    reconstruction: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    quantizer_loss: torch.Tensor | None = None
    metrics: dict[str, float] | None = None


class ImageTokenizer(PreTrainedModel):
    """Encoder → bottleneck → decoder. Pixels are (b, 3, H, W) in [-1, 1], H and W multiples of the factor."""

    config_class = ImageTokenizerConfig
    main_input_name = "pixel_values"
    base_model_prefix = "image_tokenizer"
    _no_split_modules: list[str] = []

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__(config)
        c = config
        if c.bottleneck == "patches":
            self.bottleneck = RawPatches(c.patch_size)
            self.encoder = None
            self.decoder = None
            # Raw patches have no weights, but transformers reads dtype/device from the first
            # parameter when saving and moving; this frozen scalar is that parameter (unused).
            self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)
        else:
            if c.bottleneck == "fsq":
                self.bottleneck = FSQ(
                    c.fsq_levels, entropy_weight=c.fsq_entropy_weight, entropy_mode=c.fsq_entropy_mode
                )
                enc_out = len(c.fsq_levels)
            elif c.bottleneck == "vq":
                self.bottleneck = VectorQuantizer(
                    c.vq_codebook_size,
                    c.vq_dim,
                    gradient=c.vq_gradient,
                    distance=c.vq_distance,
                    ema=c.vq_ema,
                    decay=c.vq_decay,
                    beta=c.vq_beta,
                    kmeans_init=c.vq_kmeans_init,
                    dead_code_steps=c.vq_dead_code_steps,
                )
                enc_out = c.vq_dim
            else:
                self.bottleneck = ContinuousBottleneck(
                    c.latent_channels, kind=c.continuous_kind, kl_weight=c.kl_weight, noise_std=c.noise_std
                )
                enc_out = self.bottleneck.in_dim
            arch = dict(
                base_channels=c.base_channels,
                channel_mult=c.channel_mult,
                num_res_blocks=c.num_res_blocks,
                mid_blocks=c.mid_blocks,
                norm_groups=c.norm_groups,
            )
            self.encoder = Encoder(c.in_channels, out_channels=enc_out, **arch)
            self.decoder = Decoder(c.token_dim, out_channels=c.in_channels, **arch)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default init for convs and norms (what the autoencoder is tuned for).

        transformers calls this for modules whose weights a checkpoint did not provide (and for
        modules with non-persistent buffers, which it re-creates uninitialized), so it must really
        initialize them.
        """
        if isinstance(module, (nn.Conv2d, nn.GroupNorm)):
            module.reset_parameters()
        elif isinstance(module, VectorQuantizer):
            module.reset_usage()  # its only non-persistent buffer

    # ------------------------------------------------------------------ helpers
    def check_pixels(self, pixels: torch.Tensor) -> None:
        """Raise a clear error for inputs the encoder cannot take."""
        f = self.config.downsample_factor
        if pixels.ndim != 4 or pixels.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected pixels of shape (b, {self.config.in_channels}, H, W), got {tuple(pixels.shape)}"
            )
        h, w = pixels.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"image size {h}×{w} is not supported: height and width must be multiples of {f} "
                f"(the tokenizer's downsampling factor)"
            )

    def _encode_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) → channel-last pre-bottleneck features (b, h, w, c)."""
        self.check_pixels(pixels)
        if self.encoder is None:
            return patchify(pixels, self.config.patch_size)  # (b, H/p, W/p, p·p·3)
        return self.encoder(pixels).permute(0, 2, 3, 1)  # (b, c, h, w) → (b, h, w, c)

    def _decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Channel-last codes (b, h, w, c) → pixels (b, 3, H, W)."""
        if self.decoder is None:
            return unpatchify(codes, self.config.patch_size)
        return self.decoder(codes.permute(0, 3, 1, 2))  # (b, h, w, c) → (b, c, h, w)

    # ------------------------------------------------------------------ public API
    def forward(self, pixel_values: torch.Tensor) -> ImageTokenizerOutput:
        """Reconstruct ``pixel_values``; returns the reconstruction, tokens and the bottleneck loss."""
        feats = self._encode_features(pixel_values)
        out = self.bottleneck(feats)
        recon = self._decode_codes(out.quantized)
        tokens = out.indices if out.indices is not None else out.quantized
        return ImageTokenizerOutput(
            reconstruction=recon, tokens=tokens, quantizer_loss=out.loss, metrics=dict(out.metrics)
        )

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (b, 3, H, W) in [-1, 1] → LongTensor (b, h, w) for discrete tokenizers, or
        FloatTensor (b, h, w, c) of raw (unnormalized) latents / patches for continuous ones."""
        feats = self._encode_features(pixels)
        if self.config.bottleneck == "fsq":
            return self.bottleneck(feats).indices
        if self.config.bottleneck == "vq":
            return self.bottleneck.codes_to_indices(feats)
        if self.config.bottleneck == "continuous":
            return self.bottleneck.deterministic(feats)
        return feats

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens from :meth:`encode` → pixels (b, 3, H, W), clamped to [-1, 1]."""
        if self.config.is_discrete:
            if tokens.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"a discrete tokenizer decodes integer indices, got {tokens.dtype}")
            codes = self.bottleneck.indices_to_codes(tokens.long())
        else:
            if tokens.shape[-1] != self.config.token_dim:
                raise ValueError(
                    f"expected tokens (b, h, w, {self.config.token_dim}), got {tuple(tokens.shape)}"
                )
            codes = tokens if self.decoder is None else tokens.to(self.decoder.net[0].weight.dtype)
        return self._decode_codes(codes).clamp(-1, 1)

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw continuous tokens → zero-mean unit-std tokens, with the stats stored in the config."""
        if self.config.latent_mean is None or self.config.latent_std is None:
            raise ValueError(
                "this tokenizer has no latent statistics; run training (or compute_latent_stats) first"
            )
        return normalize_latents(latents, self.config.latent_mean, self.config.latent_std)

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.config.latent_mean is None or self.config.latent_std is None:
            raise ValueError(
                "this tokenizer has no latent statistics; run training (or compute_latent_stats) first"
            )
        return denormalize_latents(latents, self.config.latent_mean, self.config.latent_std)

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) for an image of height×width pixels."""
        f = self.config.downsample_factor
        if height % f or width % f or height < f or width < f:
            raise ValueError(
                f"image size {height}×{width}: height and width must be positive multiples of {f}"
            )
        return height // f, width // f


AutoConfig.register(ImageTokenizerConfig.model_type, ImageTokenizerConfig)
AutoModel.register(ImageTokenizerConfig, ImageTokenizer)
