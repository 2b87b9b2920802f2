"""Causal softmax attention with rotary positions: the recall baseline that MQAR is easy for."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.common import fold_members
from lab.errors import LabError
from lab.models.common import ModelConfig, check_range


@dataclass
class AttentionConfig(ModelConfig):
    name: str = "attention"
    num_heads: int = 2
    rope_base: float = 10000.0  # rotary frequency base

    def validate(self) -> None:
        super().validate()
        check_range(self, "num_heads", low=1)
        check_range(self, "rope_base", low=0, low_open=True)
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise LabError(
                f"model.num_heads={self.num_heads}: d_model={self.d_model} must split into heads of even size"
            )


def rotate(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding on `[B, T, H, D]` (D even): pairs (x_i, x_{i+D/2}) turn by t * base^(-2i/D)."""
    seq_len, head_dim = x.shape[1], x.shape[-1]
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = torch.arange(seq_len, device=x.device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA on [B, H, T, D]. Under vmap (stacked models, lab/stacked.py) PyTorch has no batching rule
    for SDPA and loops over the members; _FoldedAttention folds them into the batch instead."""
    if torch._C._functorch.is_batchedtensor(q):
        with sdpa_kernel(_FOLDED_BACKENDS):  # torch.compile traces the Function's forward right here
            return _FoldedAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# cuDNN's SDPA in a vmapped model breaks Inductor (torch 2.11: "expected Tensor() for op
# _scaled_dot_product_cudnn_attention" at run time), so stacked models pick among the others
_FOLDED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class _FoldedAttention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        # recompute the forward (SDPA keeps no graph inside a Function); attention is a small part of a step
        with torch.enable_grad(), sdpa_kernel(_FOLDED_BACKENDS):
            inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
            out = F.scaled_dot_product_attention(*inputs, is_causal=True)
        return torch.autograd.grad(out, inputs, grad)

    @staticmethod
    def vmap(info, in_dims, q, k, v):
        out = _FoldedAttention.apply(*fold_members((q, k, v), in_dims, info.batch_size))
        return out.unflatten(0, (info.batch_size, -1)), 0


class AttentionMixer(nn.Module):
    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_model // cfg.num_heads
        self.rope_base = cfg.rope_base
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv_proj(x).view(batch, seq_len, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = rotate(q, self.rope_base), rotate(k, self.rope_base)
        out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # SDPA wants [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))

    def state_size(self, seq_len: int) -> int:
        """KV cache for a sequence of seq_len tokens, fp32 bytes."""
        return 2 * seq_len * self.num_heads * self.head_dim * 4
