"""gla: chunk-wise torch path vs the token-by-token reference (float64), state carrying, errors."""

import pytest
import torch

from kernels import gla

B, H, DK, DV = 2, 2, 48, 32


pytestmark = pytest.mark.usefixtures("single_thread")


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_inputs(seed, seq_len, *, gates="mixed", initial_state=False, dtype=torch.float64, dk=DK, dv=DV):
    """Leaf tensors q, k, v, g, S_0 (g / S_0 may be None). 'mixed' gates put g = 0 (no decay),
    g ~ -U(0, 0.1) and g = -20 (a near reset) side by side in one sequence, one per head and token;
    'channel' gates mix them the same way per key channel."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, v = randn(B, seq_len, H, dk), randn(B, seq_len, H, dv)
    k = torch.nn.functional.normalize(randn(B, seq_len, H, dk), dim=-1)
    g = None
    if gates in ("mixed", "channel"):
        gate_shape = (B, seq_len, H) if gates == "mixed" else (B, seq_len, H, dk)
        u = torch.rand(*gate_shape, generator=gen, dtype=torch.float64)
        g = torch.where(u < 0.15, -20.0, torch.where(u < 0.35, 0.0, -0.1 * u))
    state = randn(B, H, dv, dk) if initial_state else None
    tensors = [q, k, v, g, state]
    return [None if x is None else x.to(dtype).requires_grad_() for x in tensors]


def outputs_and_grads(inputs, backend, **kwargs):
    """{name: tensor}: o, S_T and the grads of a random projection of both w.r.t. every given input."""
    q, k, v, g, state = inputs
    o, final_state = gla(q, k, v, g, initial_state=state, output_final_state=True, backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(1234)
    loss = sum((x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum() for x in (o, final_state))
    leaves = {
        name: x for name, x in zip(["dq", "dk", "dv", "dg", "dS_0"], inputs, strict=True) if x is not None
    }
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"o": o, "S_T": final_state, **dict(zip(leaves, grads, strict=True))}


@pytest.mark.parametrize(
    "seq_len, chunk_size, gates, initial_state",
    [
        (100, 64, "mixed", True),  # T not a multiple of the chunk
        (100, 16, "mixed", False),  # many chunk boundaries
        (100, 64, None, True),  # g = None
        (20, 64, "mixed", True),  # T < chunk
        (1, 64, "mixed", True),
        (100, 16, "channel", True),  # a decay per key channel
        (100, 64, "channel", False),
        (20, 64, "channel", True),
    ],
)
def test_torch_matches_reference(seq_len, chunk_size, gates, initial_state):
    seed = seq_len + chunk_size + len(gates or "")  # a different seed for every row above
    inputs = make_inputs(seed, seq_len, gates=gates, initial_state=initial_state)
    fast = outputs_and_grads(inputs, "torch", chunk_size=chunk_size)
    slow = outputs_and_grads(inputs, "reference")
    assert fast.keys() == slow.keys()
    for name in fast:
        assert fast[name].dtype == torch.float64
        assert rel_err(fast[name], slow[name]) < 1e-10, name


@pytest.mark.parametrize("seed", [3, 4])
def test_channel_gates_at_odd_head_dims(seed):
    inputs = make_inputs(seed, 45, gates="channel", initial_state=True, dk=13, dv=7)
    fast = outputs_and_grads(inputs, "torch", chunk_size=8)
    slow = outputs_and_grads(inputs, "reference")
    for name in fast:
        assert rel_err(fast[name], slow[name]) < 1e-10, name


def test_channel_gates_equal_across_channels_are_a_head_gate():
    q, k, v, g, state = (x.detach() for x in make_inputs(21, 50, initial_state=True))
    per_head = gla(q, k, v, g, initial_state=state, chunk_size=16)
    per_channel = gla(q, k, v, g[..., None].expand(*g.shape, DK), initial_state=state, chunk_size=16)
    assert rel_err(per_channel, per_head) < 1e-12


def test_scale_and_dtype():
    q, k, v, g, _ = make_inputs(7, 30, dtype=torch.float32)
    o = gla(q, k, v, g, scale=0.5)
    assert o.dtype == torch.float32 and o.shape == (B, 30, H, DV)
    o_ref = gla(q, k, v, g, scale=0.5, backend="reference")
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(gla(q, k, v, g, scale=1.0), 2 * o) < 1e-6


def test_state_carries_across_calls():
    q, k, v, g, state = make_inputs(11, 100, initial_state=True)
    full, full_state = gla(q, k, v, g, initial_state=state, output_final_state=True)
    split = 37  # not chunk aligned
    first, mid_state = gla(
        q[:, :split], k[:, :split], v[:, :split], g[:, :split], initial_state=state, output_final_state=True
    )
    second, end_state = gla(
        q[:, split:],
        k[:, split:],
        v[:, split:],
        g[:, split:],
        initial_state=mid_state,
        output_final_state=True,
    )
    assert rel_err(torch.cat([first, second], dim=1), full) < 1e-12
    assert rel_err(end_state, full_state) < 1e-12


@pytest.mark.parametrize("gate_shape", [(B, 2048, H), (B, 2048, H, DK)])
def test_long_sequence_fp32_stays_finite_and_accurate(gate_shape):
    # T = 2048 without decay (the state only grows) and with g = -30 (exp(G) underflows to 0).
    q, k, v, _, _ = make_inputs(5, 2048, gates=None)
    for g_value in (0.0, -30.0):
        g = torch.full(gate_shape, g_value, dtype=torch.float64)
        results = {}
        for dtype in (torch.float32, torch.float64):
            leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, g)]
            o = gla(*leaves)
            results[dtype] = [o, *torch.autograd.grad(o.square().sum(), leaves)]
            assert all(torch.isfinite(x).all() for x in results[dtype])
        assert rel_err(results[torch.float32][0].double(), results[torch.float64][0]) < 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "triton"}, "gla: unknown backend 'triton'; allowed: 'auto', 'torch', 'reference'"),
        ({"chunk_size": 0}, "gla: chunk_size must be >= 1, got 0"),
        ({"k": torch.zeros(2, 5, 3, 7)}, r"gla: k has shape \(2, 5, 3, 7\), expected \[B, T, H, Dk\]"),
        ({"v": torch.zeros(2, 4, 3, 6)}, r"gla: v has shape \(2, 4, 3, 6\), expected"),
        ({"g": torch.zeros(2, 5)}, r"gla: g has shape \(2, 5\), expected \[B, T, H\] = \(2, 5, 3\) or \[B, T, H, Dk\]"),
        ({"g": torch.zeros(2, 5, 4)}, r"gla: g has shape \(2, 5, 4\), expected \[B, T, H\] = \(2, 5, 3\) or"),
        ({"g": torch.zeros(2, 5, 3, 7)}, r"gla: g has shape \(2, 5, 3, 7\), expected .* or \[B, T, H, Dk\] = \(2, 5, 3, 8\) of k"),
        ({"initial_state": torch.zeros(2, 3, 8)}, r"gla: initial_state has shape \(2, 3, 8\)"),
        ({"q": torch.zeros(5, 3, 8)}, r"gla: q must be \[B, T, H, Dk\], got shape \(5, 3, 8\)"),
    ],
)
def test_argument_errors(kwargs, message):
    args = {"q": torch.zeros(2, 5, 3, 8), "k": torch.zeros(2, 5, 3, 8), "v": torch.zeros(2, 5, 3, 6)} | kwargs
    with pytest.raises(ValueError, match=message) as error:
        gla(**args)
    assert "\n" not in str(error.value)
