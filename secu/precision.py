"""The autocast dtype of mixed precision, shared by training and inference.

bfloat16 where the GPU supports it (Ampere and later): the range of float32, so no loss scaling is
needed. Older GPUs (V100, T4) fall back to float16, which training pairs with a gradient scaler.
On CPU autocast is not used (``OptimConfig.mixed_precision`` is ignored there); the dtype returned
for CPU is bfloat16, the one CPU autocast supports, for callers that pass ``enabled=False`` anyway.
"""

from __future__ import annotations

import torch


def autocast_dtype(device: torch.device) -> torch.dtype:
    """The dtype for ``torch.autocast`` on ``device``.

    CUDA: bfloat16 when ``torch.cuda.is_bf16_supported()``, else float16. Any other device:
    bfloat16 (callers disable autocast on CPU).
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16
