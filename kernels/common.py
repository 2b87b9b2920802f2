"""Dtype policy and argument checks shared by the ops in `kernels`."""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32 at least: bf16/fp16 inputs are upcast, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def check_choice(op: str, name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{op}: unknown {name} {value!r}; allowed: {', '.join(map(repr, allowed))}")


def check_shape(op: str, name: str, tensor: torch.Tensor, expected: tuple, layout: str) -> None:
    """`layout` names the axes (e.g. "[B, T, H, Dv]") so the message says where `expected` comes from."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"{op}: {name} has shape {tuple(tensor.shape)}, expected {layout} = {tuple(expected)}"
        )
