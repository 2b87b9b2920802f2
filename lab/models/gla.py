"""Gated linear attention (GLA) with one scalar decay per head and token: S_t = gamma_t S_{t-1} + v_t k_t^T.

The decay is GLA's gate, gamma_t = exp(logsigmoid(gate_proj(x)) / gate_normalizer), here one per head
(as in flash-linear-attention's "simple GLA") rather than GLA's per key channel, so it runs on
kernels.gla. Optional short conv + SiLU on q, k, v; output RMSNorm(o) * SiLU(gate) per head.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.gla import BACKENDS, gla
from lab.models.common import Fp32RMSNorm, ModelConfig, ShortConv, check_choice, check_heads, check_range


@dataclass
class GLAConfig(ModelConfig):
    name: str = "gla"
    num_heads: int = 2
    head_dim: int | None = None  # query/key channels per head; None = d_model // num_heads
    expand_v: int = 1  # value channels per head = expand_v * head_dim
    gate_normalizer: float = 16.0  # log gamma = logsigmoid(.) / this; GLA's 16 starts with slow forgetting
    conv_size: int = 4  # short causal conv on q, k, v; 0 = none (Zoology's and fla's GLA default)
    chunk_size: int = 64  # tokens per chunk of the chunk-wise path (any T works)
    backend: str = "auto"  # kernels.gla backend

    def validate(self) -> None:
        super().validate()
        check_heads(self)
        check_range(self, "expand_v", low=1)
        check_range(self, "gate_normalizer", low=0, low_open=True)
        check_range(self, "conv_size", low=0)
        check_range(self, "chunk_size", low=1)
        check_choice(self, "backend", BACKENDS)


class GLAMixer(nn.Module):
    def __init__(self, cfg: GLAConfig):
        super().__init__()
        self.cfg = cfg
        self.num_heads = cfg.num_heads
        self.key_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
        self.value_dim = cfg.expand_v * self.key_dim
        self.widths = [self.num_heads * self.key_dim] * 2 + [self.num_heads * self.value_dim]  # q, k, v
        self.qkv_proj = nn.Linear(cfg.d_model, sum(self.widths), bias=False)
        self.qkv_conv = ShortConv(sum(self.widths), cfg.conv_size) if cfg.conv_size else None
        self.gate_proj = nn.Linear(cfg.d_model, self.num_heads)
        self.out_gate_proj = nn.Linear(cfg.d_model, self.widths[2], bias=False)
        self.out_norm = Fp32RMSNorm(self.value_dim, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(self.widths[2], cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        qkv = self.qkv_proj(x)
        if self.qkv_conv is not None:
            qkv = self.qkv_conv(qkv)
        q, k, v = qkv.split(self.widths, dim=-1)
        q = q.view(batch, seq_len, self.num_heads, self.key_dim)
        k = k.view(batch, seq_len, self.num_heads, self.key_dim)
        v = v.view(batch, seq_len, self.num_heads, self.value_dim)
        log_decay = F.logsigmoid(self.gate_proj(x).float()) / self.cfg.gate_normalizer
        out = gla(q, k, v, log_decay, chunk_size=self.cfg.chunk_size, backend=self.cfg.backend)
        out = self.out_norm(out) * F.silu(self.out_gate_proj(x).view(out.shape))
        return self.o_proj(out.reshape(batch, seq_len, -1))

    def state_size(self, seq_len: int) -> int:
        """fp32 bytes a decoder keeps: S (Dv x Dk) per head, plus the conv window (Zoology's GLA formula)."""
        conv = self.qkv_conv.state_numel() if self.qkv_conv is not None else 0
        return 4 * (self.num_heads * self.key_dim * self.value_dim + conv)
