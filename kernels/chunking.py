"""Chunk utilities shared by the chunk-wise parallel paths of `gla` and `gka`.

A sequence [B, T, H, ...] is zero-padded to N * C tokens and viewed head-major as
[B, H, N, C, ...], so every per-chunk matmul batches over (B, H, N).
"""

import torch

from .common import compute_dtype


def to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T, H, *rest] -> [B, H, N, C, *rest], zero-padding T up to a multiple of C.

    Zero padding is inert for every recurrence here: a zero key/value adds nothing to a state,
    a zero log-decay (g = 0) leaves it undecayed, so the padded tail doesn't change the final state.
    """
    batch, seq_len = x.shape[:2]
    num_chunks = -(-seq_len // chunk_size)
    pad = num_chunks * chunk_size - seq_len
    if pad:
        x = torch.cat([x, x.new_zeros(batch, pad, *x.shape[2:])], dim=1)
    return x.reshape(batch, num_chunks, chunk_size, *x.shape[2:]).movedim(3, 1)


def from_chunks(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, H, N, C, *rest] -> [B, T, H, *rest], dropping the padded tail."""
    batch, heads, num_chunks, chunk_size = x.shape[:4]
    x = x.movedim(1, 3).reshape(batch, num_chunks * chunk_size, heads, *x.shape[4:])
    return x[:, :seq_len]


def cumulative_log_decay(g: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """g [B, T, H] -> G [B, H, N, C] (or per key channel, [B, T, H, Dk] -> [B, H, N, C, Dk]): log of the
    decay from the start of the chunk through token c.

    Restarting the sum at every chunk keeps G bounded by one chunk's worth of gates, which limits
    the cancellation in the differences G_c - G_j of `decay_mask`.
    """
    return to_chunks(g, chunk_size).cumsum(3)


def decay_mask(log_decay: torch.Tensor) -> torch.Tensor:
    """G [..., C] -> M [..., C, C] with M[c, j] = exp(G_c - G_j) for j <= c and 0 above the diagonal.

    The upper triangle is masked to -inf *before* the exp: there G_c - G_j >= 0 can be huge
    (e.g. 64 tokens of g = -30 give 1920) and exp overflows to inf; masking afterwards would
    compute inf * 0 = NaN.
    """
    chunk_size = log_decay.shape[-1]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=log_decay.device).tril()
    diff = log_decay[..., :, None] - log_decay[..., None, :]
    return diff.masked_fill(~causal, float("-inf")).exp()


def scan_chunk_states(
    k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, initial_state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """State at the start of every chunk of S_t = exp(g_t) S_{t-1} + v_t k_t^T, and the final state.

    k [B, H, N, C, Dk], v [B, H, N, C, Dv], log_decay G [B, H, N, C] (or [B, H, N, C, Dk]: a decay per key
    channel, which scales the state's columns), initial_state [B, H, Dv, Dk] or None.
    Returns (start_states [B, H, N, Dv, Dk], final_state [B, H, Dv, Dk]). Within a chunk the update
    is one matmul; only the N chunk boundaries are sequential. (GKA's key covariance is this with v = k.)
    """
    batch, heads, num_chunks = k.shape[:3]
    if log_decay.dim() < k.dim():  # one decay per head: the same for every key channel
        log_decay = log_decay[..., None]
    decay_to_chunk_end = (log_decay[..., -1:, :] - log_decay).exp()
    chunk_updates = v.mT @ (k * decay_to_chunk_end)
    chunk_decay = log_decay[..., -1, None, :].exp()
    state = initial_state
    if state is None:
        state = k.new_zeros(batch, heads, v.shape[-1], k.shape[-1])
    start_states = []
    for n in range(num_chunks):
        start_states.append(state)
        state = chunk_decay[:, :, n] * state + chunk_updates[:, :, n]
    return torch.stack(start_states, dim=2), state


def chunk_inputs(q, k, v, g, chunk_size: int):
    """The common front end of the chunk paths: q, k, v [B, T, H, D] -> [B, H, N, C, D] in the compute
    dtype (fp32 at least), and g [B, T, H] or [B, T, H, Dk] (None = no decay) -> the in-chunk cumulative
    log-decay G."""
    dtype = compute_dtype(q.dtype)
    if g is None:
        g = q.new_zeros(q.shape[:3])
    q, k, v = (to_chunks(x.to(dtype), chunk_size) for x in (q, k, v))
    return q, k, v, cumulative_log_decay(g.to(dtype), chunk_size)
