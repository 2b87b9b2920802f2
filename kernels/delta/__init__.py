"""The (gated) delta rule: DeltaNet's and Gated DeltaNet's state update, chunk-wise and token by token."""

from ..common import check_choice, check_chunk_size, check_qkvg, check_shape
from .chunk import chunk_delta_rule
from .reference import reference_delta_rule

BACKENDS = ("auto", "torch", "reference")


def delta_rule(
    q,
    k,
    v,
    beta,
    g=None,
    *,
    scale=None,
    chunk_size=64,
    initial_state=None,
    output_final_state=False,
    backend="auto",
):
    """Gated delta rule (g = None: DeltaNet's plain delta rule).

        S_t = exp(g_t) S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T      S [B, H, Dv, Dk]
        o_t = scale * S_t q_t

    With ||k_t|| = 1 and b_t in [0, 1], I - b_t k_t k_t^T is a contraction, so the state stays bounded
    without any decay: the update overwrites the value stored under k_t instead of adding to it.

    Args:
        q, k: [B, T, H, Dk] (the layers L2-normalise k; the op doesn't require it); v: [B, T, H, Dv].
        beta: [B, T, H] write rate b_t (in [0, 1] for a stable recurrence).
        g: [B, T, H] log-decay (<= 0); None means no decay.
        scale: defaults to Dk ** -0.5.
        chunk_size: tokens per chunk of the "torch" path (any T works; the tail is zero-padded).
        initial_state: S_0 [B, H, Dv, Dk] or None (zeros).
        output_final_state: also return S_T.
        backend: "torch" (chunk-wise parallel, WY / UT transform), "reference" (token loop, the test
            oracle), or "auto".
    Returns:
        o [B, T, H, Dv] in q's dtype, or (o, S_T) with S_T in the compute dtype (fp32 or float64).
    """
    check_choice("delta_rule", "backend", backend, BACKENDS)
    batch, _, heads, key_dim, value_dim = check_qkvg("delta_rule", q, k, v, {"beta": beta, "g": g})
    if beta is None:
        raise ValueError("delta_rule: beta is required ([B, T, H]; pass ones for the unit-rate rule)")
    if initial_state is not None:
        check_shape(
            "delta_rule", "initial_state", initial_state, (batch, heads, value_dim, key_dim), "[B, H, Dv, Dk]"
        )
    check_chunk_size("delta_rule", chunk_size)
    if scale is None:
        scale = key_dim**-0.5

    options = {"scale": scale, "initial_state": initial_state, "output_final_state": output_final_state}
    if backend == "reference":
        return reference_delta_rule(q, k, v, beta, g, **options)
    # "auto": a Triton kernel (or a verified flash-linear-attention one) may take CUDA tensors here;
    # until then the PyTorch chunk path serves all.
    return chunk_delta_rule(q, k, v, beta, g, chunk_size=chunk_size, **options)
