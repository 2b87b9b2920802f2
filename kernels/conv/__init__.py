"""The short causal convolution of the linear mixers: depthwise over time, then SiLU, on [B, T, C]."""

import torch

from ..common import check_choice, interpreting
from .conv1d import conv1d_short_conv
from .reference import reference_short_conv

BACKENDS = ("auto", "torch", "triton", "reference")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def short_conv(x, weight, bias=None, *, backend="auto"):
    """y[b, t, c] = silu(bias[c] + sum_{i < K} weight[c, i] * x[b, t - K + 1 + i, c]), with x = 0 before t = 0.

    Args:
        x: [B, T, C] (fp32, fp16, bf16 or float64).
        weight: [C, K], the K taps of each channel, oldest first (nn.Conv1d's [C, 1, K] squeezed).
        bias: [C] or None.
        backend: "torch" (F.conv1d on [B, C, T], weight and bias cast to x's dtype as autocast would), "triton"
            (one fused kernel on [B, T, C] each way, fp32 accumulation; CUDA tensors, or CPU ones under
            TRITON_INTERPRET=1), "reference" (shifted sums, the test oracle), or "auto" ("triton" for
            CUDA tensors, else "torch").
    Returns:
        y [B, T, C] in x's dtype.
    """
    check_choice("short_conv", "backend", backend, BACKENDS)
    if x.dim() != 3:
        raise ValueError(f"short_conv: x must be [B, T, C], got shape {tuple(x.shape)}")
    channels = x.shape[-1]
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"short_conv: weight must be [C, K] with C = {channels} (x's channels), "
                         f"got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"short_conv: bias must be [C] = ({channels},), got shape {tuple(bias.shape)}")
    if backend == "reference":
        return reference_short_conv(x, weight, bias)
    if x.numel() == 0:
        return x.clone()
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        if x.dtype not in TRITON_DTYPES:
            raise ValueError(f"short_conv: backend 'triton' takes fp32, fp16 or bf16 inputs, got {x.dtype}")
        if not (x.is_cuda or interpreting()):
            raise ValueError("short_conv: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones)")
        from .triton_conv import triton_short_conv

        return triton_short_conv(x, weight, bias)
    return conv1d_short_conv(x, weight, bias)


__all__ = ["BACKENDS", "short_conv"]
