"""Configuration dataclasses: what to quantize (QuantConfig and one subclass per method, each with its own
defaults) and how to calibrate (CalibConfig, carried by FlatQuantConfig).

Everything a method needs is passed explicitly as one of these; nothing reads global flags.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from flatquant.errors import FlatQuantError

METHODS = ("fp16", "rtn", "smoothquant", "quarot", "flatquant")
WEIGHT_QUANTIZERS = ("rtn", "gptq")  # round-to-nearest, or GPTQ's closed-form updates (flatquant/methods/gptq.py)


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
    # Weights in groups of this many input channels (None = one group per output channel).
    w_group_size: int | None = None
    # Key / value bits (None = kv_bits); KV groups of this many channels within a head (None = the head).
    k_bits: int | None = None
    v_bits: int | None = None
    kv_group_size: int | None = None
    # Per-layer / per-projection mixed precision (grammar: flatquant/mixed.py), or None.
    mixed: str | None = None

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "kv_bits"):
            _check_bits(name, getattr(self, name))
        for name in ("k_bits", "v_bits"):
            if getattr(self, name) is not None:
                _check_bits(name, getattr(self, name))
        for name in ("w_group_size", "kv_group_size"):
            g = getattr(self, name)
            if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
                raise ConfigError(f"{name} must be a positive integer (or None), got {g!r}")
        if self.mixed is not None:
            from flatquant import mixed

            mixed.parse(self.mixed)  # a spec it cannot read fails here
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

    def _mixed(self, key: str, proj: str | None, layer: int | None, default: int) -> int:
        if self.mixed is None:
            return default
        from flatquant import mixed

        return mixed.resolve(self.mixed, key, proj, layer, default)

    def weight_bits(self, proj: str, layer: int | None = None) -> int:
        """Weight bits of projection `proj` (of decoder layer `layer`: the --mixed rules for it apply)."""
        return self._mixed("w", proj, layer, self.w_bits_override.get(proj, self.w_bits))

    def act_bits(self, proj: str, layer: int | None = None) -> int:
        return self._mixed("a", proj, layer, self.a_bits_override.get(proj, self.a_bits))

    def key_bits(self, layer: int | None = None) -> int:
        return self._mixed("k", None, layer, self.kv_bits if self.k_bits is None else self.k_bits)

    def value_bits(self, layer: int | None = None) -> int:
        return self._mixed("v", None, layer, self.kv_bits if self.v_bits is None else self.v_bits)

    @property
    def tag(self) -> str:
        """Short name of the bit setting, e.g. W4A4KV4, W4A16KV16, or W16A16K2V4 when K and V differ."""
        k, v = self.key_bits(), self.value_bits()
        return f"W{self.w_bits}A{self.a_bits}" + (f"KV{k}" if k == v else f"K{k}V{v}")

    def gptq_settings(self) -> dict:
        """What GPTQ weights depend on besides the transforms and the calibration data: two configs with
        the same settings can share saved GPTQ codes."""
        return {"weight_quantizer": self.weight_quantizer, "w_bits": self.w_bits, "w_asym": self.w_asym,
                "w_bits_override": dict(self.w_bits_override), "damp": self.gptq_damp, "block": self.gptq_block,
                "act_order": self.gptq_act_order, "w_group_size": self.w_group_size, "mixed": self.mixed}

    def to_dict(self) -> dict:
        """The quantizer settings (QuantConfig's fields only: a method config's extras are not saved)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(QuantConfig)}

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        """Fields the dict lacks (a file written before they existed) take their defaults."""
        known = {f.name for f in dataclasses.fields(QuantConfig)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def normalized(cls, d: dict) -> dict:
        """`d` as a current QuantConfig writes it, so a saved config compares equal to a new one."""
        return cls.from_dict(d).to_dict()


LOSSES = ("mse", "nmse-token")


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
    scale_alpha: float = 0.5  # channel-scale init max|X|^a / max|W|^(1-a) (the reference uses 0.3)
    kv_clip_split: bool = False  # separate learnable lower/upper clip factors for the asymmetric KV quantizer
    loss: str = "mse"  # "mse": mean squared error; "nmse-token": each token's error / its target's mean square
    offload: str = "none"  # "cpu"/"disk": stream layers from the shards, activations in CPU memory / a memmap

    def __post_init__(self) -> None:
        if self.recipe not in ("svd-amp", "direct-fp32"):
            raise ConfigError(f"recipe must be 'svd-amp' or 'direct-fp32', got {self.recipe!r}")
        if self.offload not in ("none", "cpu", "disk"):
            raise ConfigError(f"offload must be 'none', 'cpu' or 'disk', got {self.offload!r}")
        if self.init not in ("orthogonal", "identity", "hadamard"):
            raise ConfigError(f"init must be 'orthogonal', 'identity' or 'hadamard', got {self.init!r}")
        for name in ("nsamples", "seqlen", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if not 0.0 <= self.scale_alpha <= 1.0:
            raise ConfigError(f"scale_alpha must be in [0, 1], got {self.scale_alpha}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not self.weight_decay >= 0.0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def recipe_settings(d: dict) -> dict:
        """The settings that change the learned parameters (execution-only switches dropped), for comparing
        a saved calibration with a requested one; fields an older file lacks take their defaults."""
        return {k: v for k, v in CalibConfig.from_dict(d).to_dict().items() if k not in ("cuda_graph", "offload")}

    @classmethod
    def from_dict(cls, d: dict) -> CalibConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Presets: "paper" is the full recipe for a GPU; "cpu-quick" finishes on a 2-core CPU for the
# 135M model in minutes (fewer, shorter windows and epochs) and still beats the baselines.
PRESETS: dict[str, dict] = {
    "paper": dict(nsamples=128, seqlen=2048, epochs=15, batch_size=4),
    "cpu-quick": dict(nsamples=16, seqlen=256, epochs=4, batch_size=4),
}
PRESET_EVAL_WINDOWS = {"cpu-quick": 8}  # quick presets also cap the perplexity windows (CLI)


def calib_preset(name: str, **overrides) -> CalibConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return CalibConfig(**{**PRESETS[name], **overrides})


# ------------------------------------------------------------------------------------ method configs ---
# One QuantConfig subclass per method: `quantize(model, QuaRotConfig())` dispatches on the type, and each
# class carries its method's defaults (the CLI builds the same objects from --method, via method_config).

@dataclass
class RTNConfig(QuantConfig):
    """Round-to-nearest: every projection and the KV cache quantized as they are."""

    method: ClassVar[str] = "rtn"


@dataclass
class SmoothQuantConfig(QuantConfig):
    """SmoothQuant scales (activation statistics on calibration windows), weight clip search on."""

    method: ClassVar[str] = "smoothquant"
    w_clip_search: bool = True


@dataclass
class QuaRotConfig(QuantConfig):
    """Randomized Hadamard rotations, weight clip search on."""

    method: ClassVar[str] = "quarot"
    w_clip_search: bool = True


@dataclass
class FlatQuantConfig(QuantConfig):
    """Learned affine transforms, scales and clipping thresholds; `calib` is the training recipe."""

    method: ClassVar[str] = "flatquant"
    calib: CalibConfig = field(default_factory=CalibConfig)


@dataclass
class FP16Config(QuantConfig):
    """No change: the model as loaded (bits fixed at 16, recorded as such)."""

    method: ClassVar[str] = "fp16"
    fixed: ClassVar[tuple[str, ...]] = ("w_bits", "a_bits", "kv_bits", "weight_quantizer", "w_clip_search", "w_asym",
                                        "w_group_size", "k_bits", "v_bits", "kv_group_size", "mixed")
    w_bits: int = 16
    a_bits: int = 16
    kv_bits: int = 16


METHOD_CONFIGS: dict[str, type[QuantConfig]] = {
    c.method: c for c in (FP16Config, RTNConfig, SmoothQuantConfig, QuaRotConfig, FlatQuantConfig)}
assert tuple(METHOD_CONFIGS) == METHODS


def method_config(method: str, **settings) -> QuantConfig:
    """The config of `method` with `settings`; a None setting takes the method's default (so a command line
    that leaves an option out gets exactly what `XConfig()` gives in Python)."""
    if method not in METHOD_CONFIGS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    cls = METHOD_CONFIGS[method]
    fixed = getattr(cls, "fixed", ())
    return cls(**{k: v for k, v in settings.items() if v is not None and k not in fixed})


def as_method_config(config: QuantConfig, method: str | None = None) -> QuantConfig:
    """`config` as its method's config type. A plain QuantConfig keeps every setting it has (the explicit
    `quantize(model, QuantConfig(...), method=...)` form) and takes `method` (default "rtn")."""
    own = getattr(type(config), "method", None)
    if own is not None:
        if method is not None and method != own:
            raise ConfigError(f"method {method!r} given with a {type(config).__name__} (method {own!r})")
        return config
    method = method or "rtn"
    if method not in METHOD_CONFIGS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHOD_CONFIGS[method](**{f.name: getattr(config, f.name) for f in dataclasses.fields(QuantConfig)})
