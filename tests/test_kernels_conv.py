"""kernels.short_conv: the Triton kernels (under the interpreter, fp32 and fp16 on CPU) and the F.conv1d path
against the float64 shifted-sum reference, at awkward sizes (T not a multiple of the 64-row block, channel
counts that are not powers of two, K = 1..5)."""

import pytest
import torch

from kernels import short_conv
from kernels.common import rel_err


def _inputs(batch, seq_len, channels, taps, *, seed, bias=True, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, channels, generator=gen, dtype=torch.float64)
    weight = torch.randn(channels, taps, generator=gen, dtype=torch.float64) / taps**0.5
    b = torch.randn(channels, generator=gen, dtype=torch.float64) if bias else None
    return x.to(dtype), weight, b


def _grads(out, grad_out, tensors):
    return torch.autograd.grad(out, [t for t in tensors if t is not None], grad_out)


CASES = [(2, 70, 5, 4, True), (1, 130, 33, 3, False), (3, 17, 130, 1, True), (1, 64, 16, 5, True)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("batch,seq_len,channels,taps,bias", CASES)
def test_matches_float64_reference(backend, batch, seq_len, channels, taps, bias):
    x64, w64, b64 = _inputs(batch, seq_len, channels, taps, seed=seq_len * 7 + channels, bias=bias)
    leaves64 = [t.requires_grad_() for t in (x64, w64, b64) if t is not None]
    want = short_conv(x64, w64, b64, backend="reference")
    grad_out = torch.randn_like(want)
    want_grads = _grads(want, grad_out, leaves64)

    x, w, b = (None if t is None else t.detach().float().requires_grad_() for t in (x64, w64, b64))
    got = short_conv(x, w, b, backend=backend)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got, want) < 1e-5
    for got_grad, want_grad in zip(_grads(got, grad_out.float(), (x, w, b)), want_grads, strict=True):
        assert got_grad.dtype == torch.float32
        assert rel_err(got_grad, want_grad) < 1e-5


def test_triton_fp16():
    x64, w64, b64 = _inputs(2, 90, 24, 4, seed=3)
    x = x64.half().requires_grad_()
    got = short_conv(x, w64.float(), b64.float(), backend="triton")
    want = short_conv(x.double(), w64, b64, backend="reference")
    assert got.dtype == torch.float16 and rel_err(got, want) < 2e-3
    grad_out = torch.randn_like(want)
    (dx,) = torch.autograd.grad(got, [x], grad_out.half())
    x_ref = x.detach().double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(short_conv(x_ref, w64, b64, backend="reference"), [x_ref], grad_out)
    assert dx.dtype == torch.float16 and rel_err(dx, dx_ref) < 2e-3


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_causal(backend):
    """An output never moves when a later input does."""
    x, w, b = (t.float() for t in _inputs(1, 100, 6, 4, seed=11))
    t0 = 57
    later = x.clone()
    later[:, t0:] = torch.randn_like(later[:, t0:])
    y, y_later = short_conv(x, w, b, backend=backend), short_conv(later, w, b, backend=backend)
    assert torch.equal(y[:, :t0], y_later[:, :t0])
    assert not torch.allclose(y[:, t0:], y_later[:, t0:])


def test_vmap_folds_members_and_their_weights():
    """Stacked models: each member's own weights and bias, the same as calling it member by member."""
    members = 3
    x, w, b = (t.float() for t in _inputs(members * 2, 75, 9, 4, seed=5))
    x = x.unflatten(0, (members, 2))
    w = torch.stack([w * (m + 1) for m in range(members)])
    b = torch.stack([b - m for m in range(members)])
    leaves = [t.requires_grad_() for t in (x, w, b)]
    stacked = torch.vmap(lambda xi, wi, bi: short_conv(xi, wi, bi, backend="triton"))(x, w, b)
    one_by_one = torch.stack([short_conv(x[m], w[m], b[m], backend="reference") for m in range(members)])
    assert rel_err(stacked, one_by_one) < 1e-5
    grad_out = torch.randn_like(stacked)
    got = torch.autograd.grad(stacked, leaves, grad_out)
    want = torch.autograd.grad(one_by_one, leaves, grad_out)
    for got_grad, want_grad in zip(got, want, strict=True):
        assert rel_err(got_grad, want_grad) < 1e-5
    # an unbatched weight (shared by all members) expands to each member
    shared = torch.vmap(lambda xi: short_conv(xi, w[0], b[0], backend="triton"))(x.detach())
    assert rel_err(shared, short_conv(x.detach().flatten(0, 1), w[0], b[0], backend="reference").unflatten(0, (members, 2))) < 1e-5


def test_torch_compile_keeps_one_graph_and_the_op_checks_out():
    """The Triton op is a custom op: Dynamo traces through it (fullgraph, no break), also stacked under vmap,
    with the gradients of eager; torch.library.opcheck checks its schema, fake and autograd registrations."""
    from kernels.conv.triton_conv import _short_conv

    x, w, b = (t.float() for t in _inputs(2, 37, 6, 4, seed=21))
    torch.library.opcheck(_short_conv, (x, w.unsqueeze(0), b.unsqueeze(0), 2))
    torch.library.opcheck(_short_conv, (x, w.unsqueeze(0), None, 2))

    def layer(xi, wi, bi):
        return short_conv(xi * 2, wi, bi, backend="triton").sin()

    members = 3
    xs, ws, bs = x.expand(members, -1, -1, -1) + 0.1, torch.stack([w] * members) * 1.5, torch.stack([b] * members)
    for fn, args in ((layer, (x, w, b)), (torch.vmap(layer), (xs, ws, bs))):
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        leaves = [a.clone().requires_grad_() for a in args]
        got = compiled(*leaves)
        got_grads = torch.autograd.grad(got.square().sum(), leaves)
        want_leaves = [a.clone().requires_grad_() for a in args]
        want = fn(*want_leaves)
        want_grads = torch.autograd.grad(want.square().sum(), want_leaves)
        assert rel_err(got, want) < 1e-6
        for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
            assert rel_err(got_grad, want_grad) < 1e-6


def test_empty_sequence():
    x = torch.zeros(2, 0, 4)
    assert short_conv(x, torch.ones(4, 3), backend="triton").shape == (2, 0, 4)


@pytest.mark.parametrize("call,message", [
    (lambda: short_conv(torch.zeros(2, 5), torch.ones(5, 3)), "x must be [B, T, C]"),
    (lambda: short_conv(torch.zeros(1, 5, 4), torch.ones(3, 3)), "weight must be [C, K] with C = 4"),
    (lambda: short_conv(torch.zeros(1, 5, 4), torch.ones(4, 3), torch.ones(3)), "bias must be [C] = (4,)"),
    (lambda: short_conv(torch.zeros(1, 5, 4), torch.ones(4, 3), backend="cuda"), "unknown backend 'cuda'"),
    (lambda: short_conv(torch.zeros(1, 5, 4, dtype=torch.float64), torch.ones(4, 3), backend="triton"),
     "takes fp32, fp16 or bf16"),
])
def test_bad_arguments_say_what_is_allowed(call, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        call()
