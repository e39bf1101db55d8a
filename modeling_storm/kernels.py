"""The optional CUDA kernels of the temporal encoder, found on first use (never at import time).

mamba_ssm's `selective_scan_fn` and causal_conv1d's `causal_conv1d_fn` have the signatures of our torch spec
(`selective_scan.selective_scan`, `torch.nn.Conv1d` + SiLU). Importing either package raises on machines without
their compiled CUDA extensions (`ModuleNotFoundError: selective_scan_cuda`), so they are imported here lazily and
cached; `mamba_kernels.cache_clear()` forgets the result (tests).
"""

import functools
from typing import Callable, NamedTuple


class MambaKernels(NamedTuple):
    selective_scan_fn: Callable | None
    causal_conv1d_fn: Callable | None


@functools.cache
def mamba_kernels() -> MambaKernels:
    """`(selective_scan_fn, causal_conv1d_fn)` from mamba_ssm / causal_conv1d; each is None where it cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError):
        selective_scan_fn = None
    try:
        from causal_conv1d import causal_conv1d_fn
    except (ImportError, OSError):
        causal_conv1d_fn = None
    return MambaKernels(selective_scan_fn, causal_conv1d_fn)
