"""Chunk-wise parallel (gated) delta rule in PyTorch: the WY / UT-transform form. Autograd is the backward.

The update S_t = gamma_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T equals S_t = gamma_t S_{t-1} + e_t k_t^T
with the written value e_t = b_t (v_t - gamma_t S_{t-1} k_t), so given the e_t the state is plain gated
linear attention. Inside a chunk with start state S_0, in-chunk cumulative log-decay G and decay mask
M[c, j] = exp(G_c - G_j) (j <= c), unrolling gamma_t S_{t-1} k_t gives for the rows E of e_t:

    (I + diag(b) A) E = diag(b) (V - diag(e^G) K S_0^T),     A = strictly lower part of (K K^T) * M

I + diag(b) A is unit lower triangular, so one triangular solve per chunk (the UT transform) gives
U = solve(b * V) and W = solve(b * e^G * K), both independent of S_0, and then E = U - W S_0^T.
Only that product and the state update are sequential over chunks; the outputs

    o_c = scale * (e^{G_c} S_0 q_c + sum_{j <= c} M[c, j] (q_c . k_j) e_j)

are one masked C x C attention per chunk, batched after the scan.
"""

import torch

from ..chunking import chunk_inputs, decay_mask, from_chunks, to_chunks


def chunk_delta_rule(q, k, v, beta, g=None, *, scale, chunk_size, initial_state=None, output_final_state=False):
    """Same contract as `reference_delta_rule`. Padded tail tokens (k = v = 0, b = 0, g = 0) write nothing."""
    seq_len = q.shape[1]
    queries, keys, values, log_decay = chunk_inputs(q, k, v, g, chunk_size)
    dtype = queries.dtype
    rates = to_chunks(beta.to(dtype), chunk_size)[..., None]  # b [B, H, N, C, 1]
    mask = decay_mask(log_decay)
    start_decay = log_decay.exp()[..., None]  # e^{G_c} [B, H, N, C, 1]

    # UT transform: one unit-lower-triangular solve for both right-hand sides, all chunks at once
    strict = torch.tril((keys @ keys.mT) * mask, diagonal=-1)
    system = torch.eye(chunk_size, dtype=dtype, device=keys.device) + rates * strict
    rhs = torch.cat([rates * values, rates * start_decay * keys], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    pseudo_values, pseudo_keys = solved.split([values.shape[-1], keys.shape[-1]], dim=-1)  # U, W

    # Sequential over chunks: the written values E = U - W S_0^T need the chunk's start state.
    decay_to_chunk_end = (log_decay[..., -1:] - log_decay).exp()[..., None]
    chunk_decay = log_decay[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]
    state = initial_state.to(dtype) if initial_state is not None else keys.new_zeros(
        keys.shape[0], keys.shape[1], values.shape[-1], keys.shape[-1]
    )
    start_states, written = [], []
    for n in range(keys.shape[2]):
        start_states.append(state)
        written_n = pseudo_values[:, :, n] - pseudo_keys[:, :, n] @ state.mT
        written.append(written_n)
        state = chunk_decay[:, :, n] * state + (written_n * decay_to_chunk_end[:, :, n]).mT @ keys[:, :, n]
    start_states, written = torch.stack(start_states, dim=2), torch.stack(written, dim=2)

    intra = ((queries @ keys.mT) * mask) @ written
    inter = start_decay * (queries @ start_states.mT)
    o = from_chunks(scale * (intra + inter), seq_len).to(q.dtype)
    return (o, state) if output_final_state else o
