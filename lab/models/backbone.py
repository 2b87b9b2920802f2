"""The pre-norm language model every mixer plugs into: embed, N x [mixer, MLP], norm, LM head."""

import torch
from torch import nn

from lab.models.common import ModelConfig


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden)
        self.down = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mixer: nn.Module):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = mixer
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.mlp_ratio else None
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio * cfg.d_model) if cfg.mlp_ratio else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x))
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, mixer_cls: type[nn.Module]):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.max_positions = cfg.max_position_embeddings
        self.pos_embed = nn.Embedding(self.max_positions, cfg.d_model) if self.max_positions else None
        self.blocks = nn.ModuleList(Block(cfg, mixer_cls(cfg)) for _ in range(cfg.num_layers))
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.apply(self._init_linear_and_embedding)

    @staticmethod
    def _init_linear_and_embedding(module: nn.Module) -> None:
        # GPT-2 style; mixers' own parameters (decay rates, conv) keep the init their constructors chose
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[B, T]` token ids -> `[B, T, d_model]` after the final norm."""
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            if input_ids.shape[1] > self.max_positions:
                raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds "
                                 f"model.max_position_embeddings={self.max_positions}")
            x = x + self.pos_embed.weight[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_size(self, seq_len: int) -> int:
        """Recurrent state of all mixer layers for one sequence, fp32 bytes (Zoology's convention)."""
        return sum(block.mixer.state_size(seq_len) for block in self.blocks)
