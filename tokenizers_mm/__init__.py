"""Stage 1: image tokenizers (FSQ, VQ, continuous latents, raw patches).

Importing this package registers ``ImageTokenizerConfig``/``ImageTokenizer`` with transformers'
Auto classes.
"""

from tokenizers_mm.bottleneck_output import BottleneckOutput
from tokenizers_mm.continuous import ContinuousBottleneck
from tokenizers_mm.fsq import FSQ
from tokenizers_mm.identity import tokenizer_identity
from tokenizers_mm.modeling import ImageTokenizer, ImageTokenizerConfig, ImageTokenizerOutput
from tokenizers_mm.patches import RawPatches, patchify, unpatchify
from tokenizers_mm.presets import PRESETS, build_tokenizer, preset_config
from tokenizers_mm.vq import VectorQuantizer

__all__ = [
    "BottleneckOutput",
    "ContinuousBottleneck",
    "FSQ",
    "ImageTokenizer",
    "ImageTokenizerConfig",
    "ImageTokenizerOutput",
    "PRESETS",
    "RawPatches",
    "VectorQuantizer",
    "build_tokenizer",
    "patchify",
    "preset_config",
    "tokenizer_identity",
    "unpatchify",
]
