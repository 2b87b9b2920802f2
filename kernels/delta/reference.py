"""Token-by-token (gated) delta rule: the readable definition and the float64 test oracle."""

import torch

from ..common import compute_dtype


def reference_delta_rule(q, k, v, beta, g=None, *, scale, initial_state=None, output_final_state=False):
    """S_t = exp(g_t) S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T, o_t = scale * S_t q_t (see `delta_rule`)."""
    batch, seq_len, heads, key_dim = q.shape
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v, beta = q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype)
    if initial_state is None:
        state = q.new_zeros(batch, heads, v.shape[-1], key_dim)
    else:
        state = initial_state.to(dtype)
    outputs = []
    for t in range(seq_len):
        k_t, b_t = k[:, t], beta[:, t, :, None, None]
        if g is not None:
            state = g[:, t].to(dtype).exp()[..., None, None] * state
        # S (I - b k k^T) + b v k^T = S + b (v - S k) k^T: replace what S recalls for k_t by v_t, at rate b_t
        recalled = (state @ k_t[..., None])[..., 0]
        state = state + b_t * (v[:, t] - recalled)[..., :, None] * k_t[..., None, :]
        outputs.append(scale * (state @ q[:, t, :, :, None])[..., 0])
    o = torch.stack(outputs, dim=1).to(out_dtype)
    return (o, state) if output_final_state else o
