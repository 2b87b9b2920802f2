"""Chunk-wise parallel gated linear attention in PyTorch.

Per chunk of C tokens with start state S_0 and in-chunk cumulative log-decay G:
    o_c = sum_{j <= c} M[c, j] (q_c . k_j) v_j  +  exp(G_c) S_0 q_c,    M[c, j] = exp(G_c - G_j)
The first term is one masked (C x C) attention, the second reads the carried state; only the
chunk start states are computed sequentially. With a decay per key channel, G_c is a vector and
M[c, j] moves inside the dot product: sum_d q_cd k_jd exp(G_cd - G_jd), a [Dk, C, C] tensor per chunk
(every exponent <= 0, so it never overflows). It is built inside `ChannelDecayScores` and rebuilt for the
backward rather than kept: kept, it would be the biggest activation of the layer (C times q's size).
"""

import torch

from ..chunking import chunk_inputs, decay_mask, from_chunks, scan_chunk_states


def gla_in_chunks(q, k, v, log_decay, mask, initial_state):
    """The chunk form on already chunked tensors (shared with gka's readout, which has G and M at hand).

    q, k [B, H, N, C, Dk], v [B, H, N, C, Dv], log_decay G [B, H, N, C], mask = decay_mask(G),
    initial_state [B, H, Dv, Dk] or None. q carries the scale. Returns (o [B, H, N, C, Dv], S_T).
    """
    start_states, final_state = scan_chunk_states(k, v, log_decay, initial_state)
    intra = ((q @ k.mT) * mask) @ v
    inter = log_decay.exp()[..., None] * (q @ start_states.mT)
    return intra + inter, final_state


class ChannelDecayScores(torch.autograd.Function):
    """A[c, j] = sum_d q_cd k_jd exp(G_cd - G_jd) for j <= c, else 0: q, k, G [..., C, Dk] -> A [..., C, C]."""

    generate_vmap_rule = True  # stacked models vmap over it

    @staticmethod
    def forward(q, k, log_decay):
        decayed_keys = decay_mask(log_decay.mT) * k.mT[..., None, :]  # [..., Dk, C, C]: M_dcj k_jd
        return torch.einsum("...cd,...dcj->...cj", q, decayed_keys)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_scores):
        q, k, log_decay = ctx.saved_tensors
        weighted = decay_mask(log_decay.mT) * grad_scores[..., None, :, :]  # dA_cj M_dcj
        grad_q = torch.einsum("...dcj,...jd->...cd", weighted, k)
        grad_k = torch.einsum("...dcj,...cd->...jd", weighted, q)
        # dA_cj / dG_cd = +q_cd k_jd M_dcj and dA_cj / dG_jd = -(the same); summed, these are q dq and k dk
        return grad_q, grad_k, q * grad_q - k * grad_k


def gla_channel_in_chunks(q, k, v, log_decay, initial_state):
    """`gla_in_chunks` with a log-decay per key channel, G [B, H, N, C, Dk]."""
    start_states, final_state = scan_chunk_states(k, v, log_decay, initial_state)
    intra = ChannelDecayScores.apply(q, k, log_decay) @ v
    inter = (q * log_decay.exp()) @ start_states.mT
    return intra + inter, final_state


def chunk_gla(q, k, v, g=None, *, scale, chunk_size, initial_state=None, output_final_state=False):
    """[B, T, H, D] front end of the chunk forms: pads to whole chunks, computes in fp32 or wider."""
    seq_len = q.shape[1]
    q_chunks, k_chunks, v_chunks, log_decay = chunk_inputs(q, k, v, g, chunk_size)
    dtype = q_chunks.dtype
    if initial_state is not None:
        initial_state = initial_state.to(dtype)
    if g is not None and g.dim() == 4:
        o, final_state = gla_channel_in_chunks(scale * q_chunks, k_chunks, v_chunks, log_decay, initial_state)
    else:
        o, final_state = gla_in_chunks(
            scale * q_chunks, k_chunks, v_chunks, log_decay, decay_mask(log_decay), initial_state
        )
    o = from_chunks(o, seq_len).to(q.dtype)
    return (o, final_state) if output_final_state else o
