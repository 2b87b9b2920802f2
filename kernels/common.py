"""Dtype policy, argument checks and helpers shared by the ops in `kernels`."""

import os

import torch


def interpreting() -> bool:
    """Whether Triton kernels run through the interpreter (TRITON_INTERPRET=1: CPU tensors, ANCHORS.md)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (the accuracy measure of the GPU checks)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32 at least: bf16/fp16 inputs are upcast, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def check_choice(op: str, name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{op}: unknown {name} {value!r}; allowed: {', '.join(map(repr, allowed))}")


def check_chunk_size(op: str, chunk_size: int) -> None:
    """Any chunk size >= 1 works: T needn't be a multiple of it (the tail chunk is padded)."""
    if chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be >= 1, got {chunk_size}")


def check_shape(op: str, name: str, tensor: torch.Tensor, expected: tuple, layout: str) -> None:
    """`layout` names the axes (e.g. "[B, T, H, Dv]") so the message says where `expected` comes from."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"{op}: {name} has shape {tuple(tensor.shape)}, expected {layout} = {tuple(expected)}"
        )


def check_qkvg(op: str, q, k, v, gates: dict) -> tuple[int, int, int, int, int]:
    """Checks q, k [B, T, H, Dk], v [B, T, H, Dv] and each [B, T, H] gate (None = absent).

    Returns (B, T, H, Dk, Dv).
    """
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be [B, T, H, Dk], got shape {tuple(q.shape)}")
    batch, seq_len, heads, key_dim = q.shape
    check_shape(op, "k", k, q.shape, "[B, T, H, Dk] of q")
    if v.dim() != 4:
        raise ValueError(f"{op}: v must be [B, T, H, Dv], got shape {tuple(v.shape)}")
    value_dim = v.shape[-1]
    check_shape(op, "v", v, (batch, seq_len, heads, value_dim), "[B, T, H, Dv] with B, T, H of q")
    for name, gate in gates.items():
        if gate is not None:
            check_shape(op, name, gate, (batch, seq_len, heads), "[B, T, H] of q")
    return batch, seq_len, heads, key_dim, value_dim


def fold_members(tensors, in_dims, members: int) -> list:
    """The tensors of a vmap rule with vmap's dimension folded into the leading batch dimension,
    [members * B, ...] (member-major; None stays None, an unbatched tensor is repeated per member).

    For ops whose batch entries never mix (stacked models, lab/stacked.py): one call over all members
    instead of vmap's loop; the result unfolds with `.unflatten(0, (members, -1))`.
    """
    def fold(tensor, dim):
        if tensor is None:
            return None
        tensor = tensor.expand(members, *tensor.shape) if dim is None else tensor.movedim(dim, 0)
        return tensor.flatten(0, 1)

    return [fold(t, d) for t, d in zip(tensors, in_dims, strict=True)]
