"""`Linear`: `nn.Linear`, plus a fast path for the one-row products of decoding on a CPU.

Every projection of the model and its LM head is a `Linear`. In training, prefill,
batches and under autocast it is exactly `nn.Linear`. The one case it changes is a
single row on CPU with autograd off, which is what a batch-1 decoding step does:
torch's CPU build runs a matrix-vector product on one core, streaming the weight at a
fraction of the memory bandwidth, while the products of one batched matmul run on all
of torch's threads at once. `row_blocked_product` cuts the weight into row blocks and
multiplies them in one `bmm` (`python -m benchmarks.decode_head` measures the layouts).
Its result equals the plain product up to float rounding, tested in tests/test_linear.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def row_blocked_product(hidden: torch.Tensor, weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """hidden (B, D) @ weight (N, D).T -> (B, N), as one batched matmul over `blocks` row blocks of the weight.

    The blocks are views, no copy: block i holds rows [i * s, i * s + Nb) with
    s = N // blocks, and the last block is as long as it must be to reach row N, so where
    N does not divide evenly it overlaps its neighbour by a few rows (an as_strided view
    needs one stride between blocks).
    """
    rows_out, width = weight.shape
    blocks = max(1, min(blocks, rows_out))
    step = rows_out // blocks
    block_rows = rows_out - (blocks - 1) * step
    weight = weight.to(hidden.dtype).contiguous()  # no copy when it already is
    stacked = weight.as_strided((blocks, block_rows, width), (step * width, width, 1))  # (k, Nb, D)
    rows = hidden.shape[0]
    parts = torch.bmm(stacked, hidden.T.unsqueeze(0).expand(blocks, width, rows))  # (k, Nb, B)
    # Rows [0, (k-1) * s) come from the first k-1 blocks, the rest from the last: (N, B) -> (B, N).
    return torch.cat([parts[:-1, :step].reshape(-1, rows), parts[-1]]).T


class Linear(nn.Linear):
    """`nn.Linear`, except that a single row on CPU without autograd (a decoding step) uses every thread."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one_row = x.numel() == x.shape[-1]
        if one_row and x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
            out = row_blocked_product(x.reshape(1, -1), self.weight, torch.get_num_threads())  # (1, N)
            out = out.view(*x.shape[:-1], -1)
            return out if self.bias is None else out + self.bias
        return super().forward(x)
