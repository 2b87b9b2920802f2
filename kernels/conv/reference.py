"""The short convolution as K shifted, weighted copies of the input (the test oracle: no conv routine)."""

import torch.nn.functional as F

from ..common import compute_dtype


def reference_short_conv(x, weight, bias=None):
    """kernels.short_conv computed in fp32 (float64 for float64 inputs); returns x's dtype."""
    dtype = compute_dtype(x.dtype)
    seq_len, taps = x.shape[1], weight.shape[1]
    padded = F.pad(x.to(dtype), (0, 0, taps - 1, 0))  # taps - 1 zeros before t = 0
    out = sum(padded[:, i:i + seq_len] * weight[:, i].to(dtype) for i in range(taps))
    if bias is not None:
        out = out + bias.to(dtype)
    return F.silu(out).to(x.dtype)
