"""Every mixer: causal, shapes right, state size by Zoology's convention, runs in float64."""

import pytest
import torch

from lab.models import MODELS, build_model

SMALL = {
    "attention_positions": {"d_model": 16, "num_heads": 2, "max_position_embeddings": 24},
    "attention": {"d_model": 16, "num_heads": 2},
    "gka": {"d_model": 16, "num_heads": 2, "head_dim": 6, "chunk_size": 8, "num_iter": 5},
    "gka_cg": {"d_model": 16, "num_heads": 2, "solver": "cg", "chunk_size": 8, "num_iter": 5, "gating": False},
    "gka_exact_const": {"d_model": 16, "num_heads": 2, "solver": "exact", "ridge_mode": "constant", "ridge_ratio": 0.25,
                            "alpha_connection": False, "chunk_size": 8},
    "mamba2": {"d_model": 16, "d_state": 4, "head_dim": 8, "chunk_size": 8},
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


def test_param_count_matches_parameters():
    model = make_mixer("gka", 0)
    assert model.num_params() == sum(p.numel() for p in model.parameters()) > 0
