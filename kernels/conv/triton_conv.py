"""The short convolution as one Triton kernel each way, on [B, T, C] as the mixers hold it.

F.conv1d wants [B, C, T]: the mixers' [B, T, C] activations go through a strided copy each way, and the
conv, the SiLU and their backward are separate launches (an H200 profile of the GKA cell, 2026-12-04: the
convolutions and their copies were ~2.9 ms of a 12.5 ms step). Here one kernel reads the K shifted rows of
a [rows, C-block] tile, accumulates in fp32 and applies the SiLU; the backward recomputes the pre-activation of the
K output rows each input row feeds (K*K loads of a tile the cache already holds) instead of storing it.

The weight gradient is summed per (sample, time block) into an fp32 buffer and reduced in torch: no atomics,
so it is deterministic. Weights come in groups, [W, C, K] with sample n using group n // per_weight: the
vmap rule (stacked models, lab/stacked.py) folds the members into the batch and their weights into groups.
"""

import torch
import triton
import triton.language as tl

from ..common import fold_members

# (rows a program, warps) each way. The backward holds ~5 [rows, 128] fp32 tiles at once: at 64 rows and 4 warps
# it spilled and took 0.75 ms at 256x256x384 bf16 against the forward's 0.05 (H200, 2026-12-04 21:03 UTC);
# kernels.conv.gpu_check races the settings (module attributes, so it can set them).
FWD_BLOCK_T, FWD_WARPS = 64, 4
BWD_BLOCK_T, BWD_WARPS = 32, 4


@triton.jit
def _rows(ptr, rows, cols, T, C):
    """The [rows, cols] tile of a [T, C] slab, 0 outside it (before t = 0 is the causal padding)."""
    mask = ((rows >= 0) & (rows < T))[:, None] & (cols < C)[None, :]
    return tl.load(ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _pre_activation(x_ptr, w_ptr, bias, out_rows, cols, T, C, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr):
    pre = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        pre += bias[None, :]
    for i in tl.static_range(K):
        tap = tl.load(w_ptr + cols * K + i, mask=cols < C, other=0.0).to(tl.float32)
        pre += _rows(x_ptr, out_rows - (K - 1) + i, cols, T, C) * tap[None, :]
    return pre


@triton.jit
def _short_conv_fwd(x_ptr, w_ptr, b_ptr, y_ptr, T, C, PER_WEIGHT, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr):
    n = tl.program_id(2)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    sample = n.to(tl.int64) * T * C
    group = (n // PER_WEIGHT).to(tl.int64)
    bias = tl.zeros([BC], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + group * C + cols, mask=cols < C, other=0.0).to(tl.float32)
    pre = _pre_activation(x_ptr + sample, w_ptr + group * C * K, bias, rows, cols, T, C, K, HAS_BIAS, BT, BC)
    y = pre * tl.sigmoid(pre)
    mask = (rows < T)[:, None] & (cols < C)[None, :]
    tl.store(y_ptr + sample + rows[:, None] * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _short_conv_bwd(x_ptr, w_ptr, b_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, T, C, PER_WEIGHT, T_BLOCKS,
                    K: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    n = tl.program_id(2)
    t_block = tl.program_id(0)
    rows = t_block * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    col_ok = cols < C
    sample = n.to(tl.int64) * T * C
    group = (n // PER_WEIGHT).to(tl.int64)
    weights = w_ptr + group * C * K
    bias = tl.zeros([BC], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + group * C + cols, mask=col_ok, other=0.0).to(tl.float32)
    # partial sums of this (sample, time block): dw [N, T_BLOCKS, C, K], db [N, T_BLOCKS, C]
    part = n.to(tl.int64) * T_BLOCKS + t_block
    dx = tl.zeros([BT, BC], dtype=tl.float32)
    # x[t] feeds y[t + j] through tap K - 1 - j
    for j in tl.static_range(K):
        pre = _pre_activation(x_ptr + sample, weights, bias, rows + j, cols, T, C, K, HAS_BIAS, BT, BC)
        sig = tl.sigmoid(pre)
        # rows past T load dy = 0: those outputs do not exist
        dpre = _rows(dy_ptr + sample, rows + j, cols, T, C) * sig * (1.0 + pre * (1.0 - sig))
        tap = tl.load(weights + cols * K + (K - 1 - j), mask=col_ok, other=0.0).to(tl.float32)
        dx += dpre * tap[None, :]
        if j == 0:  # dpre of this block's own rows: the weight and bias gradients
            if HAS_BIAS:
                tl.store(db_ptr + part * C + cols, tl.sum(dpre, axis=0), mask=col_ok)
            for i in tl.static_range(K):
                x_shift = _rows(x_ptr + sample, rows - (K - 1) + i, cols, T, C)
                tl.store(dw_ptr + (part * C + cols) * K + i, tl.sum(dpre * x_shift, axis=0), mask=col_ok)
    mask = (rows < T)[:, None] & col_ok[None, :]
    tl.store(dx_ptr + sample + rows[:, None] * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(x, block_t):
    samples, seq_len, channels = x.shape
    block_c = min(128, triton.next_power_of_2(channels))
    return (triton.cdiv(seq_len, block_t), triton.cdiv(channels, block_c), samples), block_c


def _forward(x, weight, bias, per_weight):
    x, weight = x.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty_like(x)
    grid, block_c = _grid(x, FWD_BLOCK_T)
    _short_conv_fwd[grid](x, weight, weight if bias is None else bias, y, x.shape[1], x.shape[2], per_weight,
                          K=weight.shape[-1], HAS_BIAS=bias is not None, BT=FWD_BLOCK_T, BC=block_c,
                          num_warps=FWD_WARPS)
    return y


def _backward(dy, x, weight, bias, per_weight):
    x, weight, dy = x.contiguous(), weight.contiguous(), dy.contiguous()
    bias = None if bias is None else bias.contiguous()
    samples, _, channels = x.shape
    grid, block_c = _grid(x, BWD_BLOCK_T)
    t_blocks = grid[0]
    dx = torch.empty_like(x)
    dw_part = torch.empty(samples, t_blocks, channels, weight.shape[-1], device=x.device, dtype=torch.float32)
    db_part = torch.empty(samples, t_blocks, channels, device=x.device, dtype=torch.float32) if bias is not None else None
    _short_conv_bwd[grid](x, weight, weight if bias is None else bias, dy, dx, dw_part,
                          dw_part if db_part is None else db_part, x.shape[1], channels, per_weight, t_blocks,
                          K=weight.shape[-1], HAS_BIAS=bias is not None, BT=BWD_BLOCK_T, BC=block_c,
                          num_warps=BWD_WARPS)
    groups = weight.shape[0]
    dw = dw_part.view(groups, -1, channels, weight.shape[-1]).sum(1).to(weight.dtype)
    # a custom op returns tensors only: an empty one stands for "no bias"
    db = weight.new_empty(0) if db_part is None else db_part.view(groups, -1, channels).sum(1).to(bias.dtype)
    return dx, dw, db


# Custom ops (not an autograd.Function behind torch.compiler.disable): torch.compile keeps them in its graph as
# calls it does not look into, so a compiled mixer is one graph instead of breaking at every convolution.
# x [N, T, C], weight [W, C, K], bias [W, C] or None; sample n uses weight group n // per_weight.
@torch.library.custom_op("lab::short_conv", mutates_args=())
def _short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, per_weight: int) -> torch.Tensor:
    return _forward(x, weight, bias, per_weight)


@_short_conv.register_fake
def _(x, weight, bias, per_weight):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("lab::short_conv_backward", mutates_args=())
def _short_conv_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         per_weight: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy, x, weight, bias, per_weight)


@_short_conv_backward.register_fake
def _(dy, x, weight, bias, per_weight):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
            weight.new_empty(0) if bias is None else torch.empty_like(bias))


def _setup_context(ctx, inputs, output):
    x, weight, bias, per_weight = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.per_weight = per_weight
    ctx.has_bias = bias is not None


def _grads(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = _short_conv_backward(dy, x, weight, bias, ctx.per_weight)
    return dx, dw, db if ctx.has_bias else None, None


def _vmap(info, in_dims, x, weight, bias, per_weight):
    # Samples never mix: the members fold into the batch ([members * N, T, C], member-major) and their
    # weights into groups ([members * W, C, K]), so sample m * N + n still finds its group by n // per_weight.
    members = info.batch_size
    x, weight, bias = fold_members((x, weight, bias), in_dims[:3], members)
    return _short_conv(x, weight, bias, per_weight).unflatten(0, (members, -1)), 0


_short_conv.register_autograd(_grads, setup_context=_setup_context)
_short_conv.register_vmap(_vmap)


def triton_short_conv(x, weight, bias=None):
    """kernels.short_conv on the Triton kernels (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    return _short_conv(x, weight.unsqueeze(0), None if bias is None else bias.unsqueeze(0), x.shape[0])
