"""Token-by-token gated linear attention: the readable definition and the test oracle."""

import torch

from ..common import compute_dtype


def reference_gla(q, k, v, g=None, *, scale, initial_state=None, output_final_state=False):
    """S_t = exp(g_t) S_{t-1} + v_t k_t^T, o_t = scale * S_t q_t, one token at a time (see `gla`)."""
    batch, seq_len, heads, key_dim = q.shape
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if initial_state is None:
        state = q.new_zeros(batch, heads, v.shape[-1], key_dim)
    else:
        state = initial_state.to(dtype)
    if g is not None and g.dim() == 3:  # one decay per head: the same for every key channel
        g = g[..., None]
    outputs = []
    for t in range(seq_len):
        if g is not None:  # scales the state's columns, one per key channel
            state = g[:, t, :, None, :].to(dtype).exp() * state
        state = state + v[:, t, :, :, None] * k[:, t, :, None, :]
        outputs.append(scale * (state @ q[:, t, :, :, None])[..., 0])
    o = torch.stack(outputs, dim=1).to(out_dtype)
    return (o, state) if output_final_state else o
