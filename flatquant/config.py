"""Configuration dataclasses: what to quantize (QuantConfig) and how to calibrate (CalibConfig).

Everything a method needs is passed explicitly as one of these; nothing reads global flags.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from flatquant.errors import FlatQuantError

METHODS = ("fp16", "rtn", "smoothquant", "quarot", "flatquant")
WEIGHT_QUANTIZERS = ("rtn", "gptq")  # round-to-nearest, or GPTQ's closed-form updates (flatquant/gptq.py)


class ConfigError(FlatQuantError, ValueError):
    """A user-facing configuration mistake (bad bits, unknown preset, ...)."""


def _check_bits(name: str, bits: int) -> None:
    if not isinstance(bits, int) or not (2 <= bits <= 16):
        raise ConfigError(f"{name} must be an integer between 2 and 16 (16 = not quantized), got {bits!r}")


@dataclass
class QuantConfig:
    """Bit widths and quantizer settings. 16 bits means 'keep in high precision'.

    Weights: per output channel, symmetric. Activations: per token, symmetric.
    KV cache: per token and head (group = head_dim), asymmetric. These are the paper's defaults.
    """

    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 4
    w_asym: bool = False
    a_asym: bool = False
    kv_asym: bool = True
    weight_quantizer: str = "rtn"
    w_clip_search: bool = False  # per-channel clip-ratio grid search for the weights (RTN grid, also GPTQ's)
    a_clip_ratio: float = 1.0
    kv_clip_ratio: float = 1.0
    # Bits per linear for mixed precision, e.g. {"down_proj": 8}; keys are projection names.
    w_bits_override: dict[str, int] = field(default_factory=dict)
    a_bits_override: dict[str, int] = field(default_factory=dict)
    # GPTQ (weight_quantizer == "gptq"): dampening as a fraction of mean(diag H), columns per lazy block,
    # columns in order of decreasing diag H ("act order").
    gptq_damp: float = 0.01
    gptq_block: int = 128
    gptq_act_order: bool = True

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "kv_bits"):
            _check_bits(name, getattr(self, name))
        for table in (self.w_bits_override, self.a_bits_override):
            for proj, bits in table.items():
                _check_bits(f"bits for {proj}", bits)
        if self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise ConfigError(f"weight_quantizer must be one of {WEIGHT_QUANTIZERS}, got {self.weight_quantizer!r}")
        for name in ("a_clip_ratio", "kv_clip_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if isinstance(self.gptq_damp, bool) or not isinstance(self.gptq_damp, (int, float)) \
                or not 0.0 < self.gptq_damp <= 1.0:
            raise ConfigError(f"gptq_damp must be in (0, 1], got {self.gptq_damp!r}")
        if isinstance(self.gptq_block, bool) or not isinstance(self.gptq_block, int) or self.gptq_block < 1:
            raise ConfigError(f"gptq_block must be a positive integer, got {self.gptq_block!r}")
        if not isinstance(self.gptq_act_order, bool):
            raise ConfigError(f"gptq_act_order must be true or false, got {self.gptq_act_order!r}")

    def weight_bits(self, proj: str) -> int:
        return self.w_bits_override.get(proj, self.w_bits)

    def act_bits(self, proj: str) -> int:
        return self.a_bits_override.get(proj, self.a_bits)

    @property
    def tag(self) -> str:
        """Short name of the bit setting, e.g. W4A4KV4 or W4A16KV16."""
        return f"W{self.w_bits}A{self.a_bits}KV{self.kv_bits}"

    def gptq_settings(self) -> dict:
        """What GPTQ weights depend on besides the transforms and the calibration data: two configs with
        the same settings can share saved GPTQ codes."""
        return {"weight_quantizer": self.weight_quantizer, "w_bits": self.w_bits, "w_asym": self.w_asym,
                "w_bits_override": dict(self.w_bits_override), "damp": self.gptq_damp, "block": self.gptq_block,
                "act_order": self.gptq_act_order}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        """Fields the dict lacks (a file written before they existed) take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def normalized(cls, d: dict) -> dict:
        """`d` as a current QuantConfig writes it, so a saved config compares equal to a new one."""
        return cls.from_dict(d).to_dict()


@dataclass
class CalibConfig:
    """Block-wise FlatQuant calibration recipe (paper Section 4.1 / Appendix B.1)."""

    nsamples: int = 128
    seqlen: int = 2048
    epochs: int = 15
    batch_size: int = 4
    lr: float = 5e-3
    clip_lr: float = 5e-2
    weight_decay: float = 0.0
    recipe: str = "svd-amp"  # "svd-amp" (default) or "direct-fp32"
    init: str = "orthogonal"  # "orthogonal" (random, as the paper), "identity" or "hadamard"
    learn_transform: bool = True  # LT
    learn_scale: bool = True  # PS
    learn_clip: bool = True  # LCT
    dataset: str = "wiki-calib"
    seed: int = 0
    cuda_graph: bool = True  # replay each layer's training step from a CUDA graph (same maths, less overhead)

    def __post_init__(self) -> None:
        if self.recipe not in ("svd-amp", "direct-fp32"):
            raise ConfigError(f"recipe must be 'svd-amp' or 'direct-fp32', got {self.recipe!r}")
        if self.init not in ("orthogonal", "identity", "hadamard"):
            raise ConfigError(f"init must be 'orthogonal', 'identity' or 'hadamard', got {self.init!r}")
        for name in ("nsamples", "seqlen", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def recipe_settings(d: dict) -> dict:
        """The settings that change the learned parameters (execution-only switches dropped), for comparing
        a saved calibration with a requested one."""
        return {k: v for k, v in d.items() if k not in ("cuda_graph",)}

    @classmethod
    def from_dict(cls, d: dict) -> CalibConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Presets: "paper" is the full recipe for a GPU; "cpu-quick" finishes on a 2-core CPU for the
# 135M model in minutes (fewer, shorter windows and epochs) and still beats the baselines.
PRESETS: dict[str, dict] = {
    "paper": dict(nsamples=128, seqlen=2048, epochs=15, batch_size=4),
    "cpu-quick": dict(nsamples=16, seqlen=256, epochs=4, batch_size=4),
    "tiny": dict(nsamples=4, seqlen=32, epochs=2, batch_size=2),  # tests only
}


def calib_preset(name: str, **overrides) -> CalibConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return CalibConfig(**{**PRESETS[name], **overrides})
