"""Online-softmax merge of partial attention results through their log-sum-exp (float32)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype partial results and gradients accumulate in: fp64 for fp64 inputs (the tests' reference
    precision), else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor,
           empty_rows: bool = False) -> None:
    """Fold a block's result into the running one, in place.

    out ``[B, S, H, D]`` and lse ``[B, H, S]`` (float32, or views of rows of such tensors) accumulate
    ``blk_out``/``blk_lse`` of the same rows. Written with sigmoid/logsigmoid so that no exp overflows:
    ``out -= sigmoid(blk_lse - lse) * (out - blk_out)``, ``lse -= logsigmoid(lse - blk_lse)``. A block row
    with ``blk_lse = -inf`` (it saw no key) leaves the row as it is. ``empty_rows``: the running rows may
    be empty too (``lse = -inf``, ``out = 0``; packed documents), which the sigmoid form would turn into NaN.
    """
    if empty_rows:
        blk_lse = blk_lse.to(lse.dtype)
        new = torch.logaddexp(lse, blk_lse)
        w = torch.exp(blk_lse - new).nan_to_num_(nan=0.0)  # NaN only where both are empty: -inf - -inf
        out.add_(w.transpose(1, 2).unsqueeze(-1) * (blk_out.to(out.dtype) - out))
        lse.copy_(new)
        return
    w = torch.sigmoid(blk_lse.to(lse.dtype) - lse).transpose(1, 2).unsqueeze(-1)
    out.sub_(w * (out - blk_out.to(out.dtype)))
    lse.sub_(F.logsigmoid(lse - blk_lse.to(lse.dtype)))
