"""The one output type that every Stage-1 bottleneck returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class BottleneckOutput:
    """Result of a bottleneck's forward pass on channel-last input ``(..., d)``.

    quantized: same shape as the input; what the decoder sees.
    indices:   LongTensor of the input shape without the last dim, or ``None`` for continuous bottlenecks.
    loss:      scalar tensor to add to the reconstruction loss (0 for FSQ and raw patches).
    metrics:   detached scalars for logging (e.g. codebook usage, perplexity, KL).
    """

    quantized: torch.Tensor
    indices: torch.Tensor | None
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
