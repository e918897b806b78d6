"""Small helpers shared by the Triton kernels' launchers."""

from __future__ import annotations

import torch


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def elementwise_block(t: torch.Tensor) -> int:
    """Elements per program: 1024 on a GPU; larger under the interpreter, where each program
    costs Python overhead and wide numpy arrays cost little."""
    return 1024 if t.is_cuda else 8192


def row_programs(rows: int, t: torch.Tensor) -> int:
    """Programs for a row-reduction backward (each sums the weight gradient of its rows):
    a few per SM on a GPU, a handful under the interpreter."""
    if t.is_cuda:
        sms = torch.cuda.get_device_properties(t.device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))
