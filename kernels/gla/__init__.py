"""Gated linear attention with a log-decay per head and token (Mamba2's mixer, GKA's readout) or per key
channel and token (GLA's own gate)."""

from ..common import check_choice, check_chunk_size, check_qkvg, check_shape
from .chunk import chunk_gla
from .reference import reference_gla

BACKENDS = ("auto", "torch", "reference")


def gla(
    q,
    k,
    v,
    g=None,
    *,
    scale=None,
    chunk_size=64,
    initial_state=None,
    output_final_state=False,
    backend="auto",
):
    """Gated linear attention.

        S_t = exp(g_t) S_{t-1} + v_t k_t^T        S [B, H, Dv, Dk]
        o_t = scale * S_t q_t
    with a scalar g_t per head, or a vector g_t per key channel: S_t = S_{t-1} diag(exp(g_t)) + v_t k_t^T.

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv].
        g: [B, T, H] log-decay (<= 0) per head, or [B, T, H, Dk] per key channel; None means no decay.
        scale: defaults to Dk ** -0.5.
        chunk_size: tokens per chunk of the "torch" path (any T works; the tail is zero-padded).
        initial_state: S_0 [B, H, Dv, Dk] or None (zeros).
        output_final_state: also return S_T.
        backend: "torch" (chunk-wise parallel), "reference" (token loop, the test oracle), or "auto".
    Returns:
        o [B, T, H, Dv] in q's dtype, or (o, S_T) with S_T in the compute dtype (fp32 or float64).
    """
    check_choice("gla", "backend", backend, BACKENDS)
    batch, seq_len, heads, key_dim, value_dim = check_qkvg("gla", q, k, v, {})
    if g is not None and tuple(g.shape) not in ((batch, seq_len, heads), tuple(k.shape)):
        raise ValueError(f"gla: g has shape {tuple(g.shape)}, expected [B, T, H] = {(batch, seq_len, heads)} or "
                         f"[B, T, H, Dk] = {tuple(k.shape)} of k")
    if initial_state is not None:
        check_shape(
            "gla", "initial_state", initial_state, (batch, heads, value_dim, key_dim), "[B, H, Dv, Dk]"
        )
    check_chunk_size("gla", chunk_size)
    if scale is None:
        scale = key_dim**-0.5

    if backend == "reference":
        return reference_gla(
            q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    # "auto": a Triton kernel will take CUDA tensors here; until then the PyTorch chunk path serves all.
    return chunk_gla(
        q,
        k,
        v,
        g,
        scale=scale,
        chunk_size=chunk_size,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )
