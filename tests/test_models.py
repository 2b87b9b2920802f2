"""Every mixer: causal, shapes right, state size by Zoology's convention, runs in float64."""

import re

import pytest
import torch

from lab.errors import LabError
from lab.models import MODELS, build_model

SMALL = {
    "attention_positions": {"d_model": 16, "num_heads": 2, "max_position_embeddings": 24},
    "attention": {"d_model": 16, "num_heads": 2},
    "gka": {"d_model": 16, "num_heads": 2, "head_dim": 6, "chunk_size": 8, "num_iter": 5},
    "gka_cg": {"d_model": 16, "num_heads": 2, "solver": "cg", "chunk_size": 8, "num_iter": 5, "gating": False},
    "gka_exact_const": {"d_model": 16, "num_heads": 2, "solver": "exact", "ridge_mode": "constant", "ridge_ratio": 0.25,
                            "alpha_connection": False, "chunk_size": 8},
    "mamba2": {"d_model": 16, "d_state": 4, "head_dim": 8, "chunk_size": 8},
    "gdn": {"d_model": 16, "num_heads": 2, "head_dim": 5, "expand_v": 2, "chunk_size": 8},
    "deltanet": {"d_model": 16, "num_heads": 2, "chunk_size": 8},
    "gla": {"d_model": 16, "num_heads": 2, "head_dim": 6, "chunk_size": 8},
    "gla_noconv": {"d_model": 16, "num_heads": 2, "conv_size": 0, "chunk_size": 8},
    "gla_channel": {"d_model": 16, "num_heads": 2, "head_dim": 5, "gate": "channel", "gate_rank": 3, "chunk_size": 8},
    "mesanet": {"d_model": 16, "num_heads": 2, "head_dim": 6, "chunk_size": 8, "num_iter": 5},
    "mesanet_exact": {"d_model": 16, "num_heads": 2, "solver": "exact", "gating": False, "input_gate": False,
                      "chunk_size": 8},
}


def make_mixer(key: str, seed: int):
    name = key.split("_")[0]
    cfg = MODELS[name][0](**SMALL[key])
    cfg.validate()
    torch.manual_seed(seed)
    return build_model(cfg, vocab_size=11).double()


@pytest.mark.parametrize("key", list(SMALL))
def test_mixer_is_causal(key):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    model = make_mixer(key, seed)
    mixer = model.blocks[0].mixer
    seq_len, cut = 21, 9  # several chunks of 8, T not a multiple of the chunk
    x = torch.randn(2, seq_len, 16, dtype=torch.float64)
    y = mixer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    x_changed = x.clone()
    x_changed[:, cut + 1:] = torch.randn_like(x_changed[:, cut + 1:]) * 3
    y_changed = mixer(x_changed)
    torch.testing.assert_close(y_changed[:, : cut + 1], y[:, : cut + 1], rtol=1e-10, atol=1e-10,
                               msg=f"seed {seed}: output at <= {cut} depends on the future")
    assert not torch.allclose(y_changed[:, cut + 1:], y[:, cut + 1:])  # the test can see a change at all


@pytest.mark.parametrize("key", list(SMALL))
def test_language_model_is_causal(key):
    model = make_mixer(key, seed=1)
    tokens = torch.randint(0, 11, (2, 19))
    logits = model(tokens)
    assert logits.shape == (2, 19, 11)
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 11
    torch.testing.assert_close(model(changed)[:, :12], logits[:, :12], rtol=1e-10, atol=1e-10)


def test_state_sizes_follow_zoology_convention():
    attention = make_mixer("attention", 0)
    # KV cache: 2 (k and v) x seq_len x d_model fp32 values per layer
    assert attention.state_size(seq_len=64) == 2 * (2 * 64 * 16 * 4)
    assert attention.state_size(seq_len=128) == 2 * attention.state_size(seq_len=64)
    gka = make_mixer("gka", 0)
    # per layer: H (6x6) and U (6x6) per head, plus a conv window of 3 steps over q, k, v (3 x 12 channels)
    assert gka.state_size(seq_len=64) == 2 * 4 * (2 * 2 * 36 + 3 * 36)
    assert gka.state_size(seq_len=4096) == gka.state_size(seq_len=64)  # recurrent: no growth with length
    mamba = make_mixer("mamba2", 0)
    # per layer: 4 heads of 8 x 4 states, conv window of 3 steps over x, B, C (32 + 4 + 4 channels)
    assert mamba.state_size(seq_len=64) == 2 * 4 * (4 * 8 * 4 + 3 * 40)


def test_state_sizes_of_the_comparison_mixers():
    # 2 layers, fp32 bytes; each: the recurrent matrices per head + a conv window of 3 steps over q, k, v
    gdn = make_mixer("gdn", 0)  # 2 heads, Dk 5, Dv 10: S is 10 x 5; conv over 10 + 10 + 20 channels
    assert gdn.state_size(seq_len=64) == 2 * 4 * (2 * 5 * 10 + 3 * 40)
    deltanet = make_mixer("deltanet", 0)  # 2 heads of 8: S is 8 x 8; conv over 3 x 16 channels
    assert deltanet.state_size(seq_len=64) == 2 * 4 * (2 * 8 * 8 + 3 * 48)
    gla = make_mixer("gla", 0)  # 2 heads, Dk = Dv = 6; conv over 3 x 12 channels
    assert gla.state_size(seq_len=64) == 2 * 4 * (2 * 6 * 6 + 3 * 36)
    assert make_mixer("gla_noconv", 0).state_size(seq_len=64) == 2 * 4 * (2 * 8 * 8)
    mesanet = make_mixer("mesanet", 0)  # as gka: H (6x6) and U (6x6) per head; the ridge is a parameter
    assert mesanet.state_size(seq_len=64) == 2 * 4 * (2 * 2 * 36 + 3 * 36)
    for model in (gdn, deltanet, gla, mesanet):
        assert model.state_size(seq_len=4096) == model.state_size(seq_len=64)


def test_mesanet_ridge_starts_at_init_and_stays_above_the_floor():
    mixer = make_mixer("mesanet", 0).blocks[0].mixer
    torch.testing.assert_close(mixer.ridge(), torch.ones(2, 6))  # ridge_init = 1
    with torch.no_grad():
        mixer.ridge_param.fill_(-50.0)
    assert (mixer.ridge() >= 0.25).all()


def test_param_count_matches_parameters():
    model = make_mixer("gka", 0)
    assert model.num_params() == sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("gdn", {"num_heads": 3}, "model.num_heads=3: must divide d_model=64"),
        ("deltanet", {"expand_v": 0}, "model.expand_v=0: must be >= 1"),
        ("gla", {"gate_normalizer": 0.0}, "model.gate_normalizer=0.0: must be > 0"),
        ("gla", {"gate": "key"}, "model.gate='key'"),
        ("gla", {"conv_size": -1}, "model.conv_size=-1: must be >= 0"),
        ("mesanet", {"ridge_init": 0.2}, "model.ridge_init=0.2: must be > 0.25"),
        ("mesanet", {"solver": "chebyshev"}, "model.solver='chebyshev': allowed values are cg, exact"),
    ],
)
def test_comparison_configs_reject_bad_values(name, overrides, message):
    cfg = MODELS[name][0](**overrides)
    with pytest.raises(LabError, match=re.escape(message)):
        cfg.validate()


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # RMSNorm's unfused bf16 path
@pytest.mark.parametrize("key", ["gdn", "deltanet", "gla", "gla_channel", "mesanet"])
def test_comparison_mixers_run_under_bf16_autocast(key):
    model = make_mixer(key, seed=0).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 11, (2, 19)))
    logits.float().square().mean().backward()
    assert torch.isfinite(logits.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
