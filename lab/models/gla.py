"""Gated linear attention (GLA): S_t = S_{t-1} diag(gamma_t) + v_t k_t^T, on kernels.gla.

The decay is GLA's gate, gamma_t = exp(logsigmoid(gate_proj(x)) / gate_normalizer), either one per head
and token (`gate=head`, flash-linear-attention's "simple GLA") or one per key channel and token from a
low-rank projection (`gate=channel`, GLA's own, which Zoology's MQAR results use). Optional short conv + SiLU
on q, k, v; output RMSNorm(o) * SiLU(gate) per head.
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
    gate: str = "head"  # decay per "head" (simple GLA) or per key "channel" (GLA's own)
    gate_rank: int = 16  # channel gates: d_model -> gate_rank -> key channels, GLA's low-rank gate projection
    gate_normalizer: float = 16.0  # log gamma = logsigmoid(.) / this; GLA's 16
    conv_size: int = 4  # short causal conv on q, k, v; 0 = none (Zoology's and fla's GLA default)
    # tokens per chunk of the chunk-wise path (any T works); None = 64 for head gates, 16 for channel gates,
    # whose in-chunk decay is a [C, C, Dk] tensor per chunk
    chunk_size: int | None = None
    backend: str = "auto"  # kernels.gla backend

    def validate(self) -> None:
        super().validate()
        check_heads(self)
        check_range(self, "expand_v", low=1)
        check_choice(self, "gate", ("head", "channel"))
        check_range(self, "gate_rank", low=1)
        check_range(self, "gate_normalizer", low=0, low_open=True)
        check_range(self, "conv_size", low=0)
        if self.chunk_size is not None:
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
        if cfg.gate == "head":
            self.gate_proj = nn.Linear(cfg.d_model, self.num_heads)
        else:
            self.gate_proj = nn.Sequential(nn.Linear(cfg.d_model, cfg.gate_rank, bias=False),
                                           nn.Linear(cfg.gate_rank, self.widths[0]))
        self.chunk_size = cfg.chunk_size or (64 if cfg.gate == "head" else 16)
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
        if self.cfg.gate == "channel":
            log_decay = log_decay.view(k.shape)
        out = gla(q, k, v, log_decay, chunk_size=self.chunk_size, backend=self.cfg.backend)
        out = self.out_norm(out) * F.silu(self.out_gate_proj(x).view(out.shape))
        return self.o_proj(out.reshape(batch, seq_len, -1))

    def state_size(self, seq_len: int) -> int:
        """fp32 bytes a decoder keeps: S (Dv x Dk) per head, plus the conv window (Zoology's GLA formula)."""
        conv = self.qkv_conv.state_numel() if self.qkv_conv is not None else 0
        return 4 * (self.num_heads * self.key_dim * self.value_dim + conv)
