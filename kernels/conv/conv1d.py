"""The short convolution through F.conv1d (the CPU path)."""

import torch.nn.functional as F


def conv1d_short_conv(x, weight, bias=None):
    """kernels.short_conv with weight and bias in x's dtype, as autocast would cast them (under vmap, stacked
    models, conv1d's batching rule hands autocast an fp32 bias beside a bf16 input, which conv1d refuses)."""
    seq_len, taps = x.shape[1], weight.shape[1]
    out = F.conv1d(x.transpose(1, 2), weight.to(x.dtype).unsqueeze(1), None if bias is None else bias.to(x.dtype),
                   padding=taps - 1, groups=x.shape[-1])
    return F.silu(out[..., :seq_len].transpose(1, 2))
