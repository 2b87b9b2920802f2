"""delta_rule: chunk-wise (WY / UT transform) torch path vs the token-by-token float64 reference, forward and
gradients, with and without decay; state carrying; fp32 accuracy on a long sequence; argument errors."""

import pytest
import torch

from kernels.delta import delta_rule

B, H = 2, 2

pytestmark = pytest.mark.usefixtures("single_thread")


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def make_inputs(seed, seq_len, *, key_dim=5, value_dim=3, gates="mixed", initial_state=False, dtype=torch.float64):
    """Leaves [q, k, v, beta, g, S_0] (g / S_0 may be None), keys L2-normalised as in the layers.
    Rates b mix 0 (no write), 1 (full overwrite) and U(0, 1); 'mixed' gates put g = 0, g ~ -U(0, 0.1)
    and g = -20 (a near reset) side by side in one sequence."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    q, v = randn(B, seq_len, H, key_dim), randn(B, seq_len, H, value_dim)
    k = torch.nn.functional.normalize(randn(B, seq_len, H, key_dim), dim=-1)
    u = rand(B, seq_len, H)
    beta = torch.where(u < 0.1, 0.0, torch.where(u < 0.2, 1.0, rand(B, seq_len, H)))
    g = None
    if gates == "mixed":
        u = rand(B, seq_len, H)
        g = torch.where(u < 0.15, -20.0, torch.where(u < 0.35, 0.0, -0.1 * u))
    state = randn(B, H, value_dim, key_dim) if initial_state else None
    return [None if x is None else x.to(dtype).requires_grad_() for x in (q, k, v, beta, g, state)]


def outputs_and_grads(inputs, backend, **kwargs):
    """{name: tensor}: o, S_T and the grads of a fixed random projection of both w.r.t. every given input."""
    q, k, v, beta, g, state = inputs
    o, final_state = delta_rule(q, k, v, beta, g, initial_state=state, output_final_state=True, backend=backend,
                                **kwargs)
    gen = torch.Generator().manual_seed(1234)
    loss = sum((x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum() for x in (o, final_state))
    names = ["dq", "dk", "dv", "dbeta", "dg", "dS_0"]
    leaves = {name: x for name, x in zip(names, inputs, strict=True) if x is not None}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"o": o, "S_T": final_state, **dict(zip(leaves, grads, strict=True))}


@pytest.mark.parametrize(
    "seq_len, chunk_size, gates, initial_state, key_dim, value_dim",
    [
        (45, 16, "mixed", True, 5, 3),  # T not a multiple of the chunk, odd head dims
        (45, 8, None, True, 7, 4),  # DeltaNet (no decay), many chunk boundaries
        (45, 64, "mixed", False, 6, 9),  # T < chunk, Dv > Dk
        (30, 1, "mixed", True, 3, 3),  # chunk of one token: the scan alone
        (1, 16, None, False, 4, 2),
    ],
)
def test_torch_matches_reference(seq_len, chunk_size, gates, initial_state, key_dim, value_dim):
    seed = fresh_seed()
    inputs = make_inputs(seed, seq_len, key_dim=key_dim, value_dim=value_dim, gates=gates,
                         initial_state=initial_state)
    fast = outputs_and_grads(inputs, "torch", chunk_size=chunk_size)
    slow = outputs_and_grads(inputs, "reference")
    assert fast.keys() == slow.keys()
    for name in fast:
        assert fast[name].dtype == torch.float64
        assert rel_err(fast[name], slow[name]) < 1e-10, f"seed {seed}: {name}"


def test_unit_rate_overwrites_and_recalls():
    # b = 1 with orthonormal keys: S_T k_i recalls exactly the last value written under k_i.
    keys = torch.eye(4, dtype=torch.float64)[[0, 1, 2, 0]]  # k_0 written twice
    values = torch.randn(4, 3, dtype=torch.float64)
    k = keys[None, :, None]
    _, state = delta_rule(k, k, values[None, :, None], torch.ones(1, 4, 1, dtype=torch.float64), chunk_size=2,
                          output_final_state=True)
    recalled = state[0, 0] @ torch.eye(4, dtype=torch.float64)[:3].T  # columns: S k_0, S k_1, S k_2
    torch.testing.assert_close(recalled.T, values[[3, 1, 2]])


def test_state_carries_across_calls():
    q, k, v, beta, g, state = make_inputs(fresh_seed(), 60, initial_state=True)
    full, full_state = delta_rule(q, k, v, beta, g, initial_state=state, output_final_state=True, chunk_size=16)
    split = 23  # not chunk aligned
    first, mid_state = delta_rule(q[:, :split], k[:, :split], v[:, :split], beta[:, :split], g[:, :split],
                                  initial_state=state, output_final_state=True, chunk_size=16)
    second, end_state = delta_rule(q[:, split:], k[:, split:], v[:, split:], beta[:, split:], g[:, split:],
                                   initial_state=mid_state, output_final_state=True, chunk_size=16)
    assert rel_err(torch.cat([first, second], dim=1), full) < 1e-12
    assert rel_err(end_state, full_state) < 1e-12


def test_long_sequence_fp32_stays_finite_and_accurate():
    # T = 1024 in chunks of 64, with no decay and with full overwrites (b = 1): the UT transform's
    # triangular solve must not amplify fp32 rounding.
    q, k, v, beta, _, _ = make_inputs(5, 1024, key_dim=16, value_dim=16, gates=None)
    for rate in (None, 1.0):
        beta_run = beta.detach() if rate is None else torch.full_like(beta, rate)
        results = {}
        for dtype in (torch.float32, torch.float64):
            leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, beta_run)]
            o = delta_rule(*leaves)
            results[dtype] = [o, *torch.autograd.grad(o.square().sum(), leaves)]
            assert all(torch.isfinite(x).all() for x in results[dtype])
        for low, high in zip(results[torch.float32], results[torch.float64], strict=True):
            assert rel_err(low.double(), high) < 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "triton"}, "delta_rule: unknown backend 'triton'; allowed: 'auto', 'torch', 'reference'"),
        ({"chunk_size": 0}, "delta_rule: chunk_size must be >= 1, got 0"),
        ({"beta": None}, r"delta_rule: beta is required"),
        ({"beta": torch.zeros(2, 5)}, r"delta_rule: beta has shape \(2, 5\), expected \[B, T, H\] of q"),
        ({"initial_state": torch.zeros(2, 3, 8)}, r"delta_rule: initial_state has shape \(2, 3, 8\)"),
    ],
)
def test_argument_errors(kwargs, message):
    args = {"q": torch.zeros(2, 5, 3, 8), "k": torch.zeros(2, 5, 3, 8), "v": torch.zeros(2, 5, 3, 6),
            "beta": torch.zeros(2, 5, 3)} | kwargs
    with pytest.raises(ValueError, match=message) as error:
        delta_rule(**args)
    assert "\n" not in str(error.value)
