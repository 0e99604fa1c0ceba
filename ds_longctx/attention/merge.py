"""Online-softmax merge of partial attention results through their log-sum-exp (float32)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def merge_(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
    """Fold a block's result into the running one, in place.

    out ``[B, S, H, D]`` and lse ``[B, H, S]`` (float32, or views of rows of such tensors) accumulate
    ``blk_out``/``blk_lse`` of the same rows. Written with sigmoid/logsigmoid so that no exp overflows:
    ``out -= sigmoid(blk_lse - lse) * (out - blk_out)``, ``lse -= logsigmoid(lse - blk_lse)``.
    """
    w = torch.sigmoid(blk_lse.to(lse.dtype) - lse).transpose(1, 2).unsqueeze(-1)
    out.sub_(w * (out - blk_out.to(out.dtype)))
    lse.sub_(F.logsigmoid(lse - blk_lse.to(lse.dtype)))
