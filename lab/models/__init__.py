"""Model registry: `model.name` -> (config dataclass, mixer class)."""

from torch import nn

from lab.errors import LabError
from lab.models.attention import AttentionConfig, AttentionMixer
from lab.models.backbone import LanguageModel
from lab.models.common import ModelConfig
from lab.models.deltanet import DeltaNetConfig, DeltaNetMixer, GatedDeltaNetConfig
from lab.models.gka import GKAConfig, GKAMixer
from lab.models.gla import GLAConfig, GLAMixer
from lab.models.mamba2 import Mamba2Config, Mamba2Mixer
from lab.models.mesanet import MesaNetConfig, MesaNetMixer

MODELS: dict[str, tuple[type[ModelConfig], type[nn.Module]]] = {
    "attention": (AttentionConfig, AttentionMixer),
    "gka": (GKAConfig, GKAMixer),
    "mamba2": (Mamba2Config, Mamba2Mixer),
    "gdn": (GatedDeltaNetConfig, DeltaNetMixer),
    "deltanet": (DeltaNetConfig, DeltaNetMixer),
    "gla": (GLAConfig, GLAMixer),
    "mesanet": (MesaNetConfig, MesaNetMixer),
}


def model_config_class(name: str) -> type[ModelConfig]:
    if name not in MODELS:
        raise LabError(f"model.name={name!r}: unknown model; available: {', '.join(MODELS)}")
    return MODELS[name][0]


def build_model(cfg: ModelConfig, vocab_size: int) -> LanguageModel:
    return LanguageModel(cfg, vocab_size, MODELS[cfg.name][1])


__all__ = ["MODELS", "LanguageModel", "ModelConfig", "build_model", "model_config_class"]
