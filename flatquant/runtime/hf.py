"""transformers integration: `quant_method: "flatquant"` in config.json makes
`AutoModelForCausalLM.from_pretrained(folder)` build the packed model (after `import flatquant`)."""
from __future__ import annotations

import copy
import sys

from flatquant.runtime import layout

_REGISTERED = False
_AUTO = "transformers.quantizers.auto"


class _RegisterAfterImport:
    """Import hook: run `register()` right after transformers imports its quantizer registry (it costs
    seconds to import, and only loading a model needs it)."""

    def find_spec(self, name, path=None, target=None):
        if name != _AUTO:
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:  # pragma: no cover
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            register()

        spec.loader.exec_module = exec_module
        return spec


def register_when_imported() -> None:
    """Register now if transformers' quantizer registry is loaded, else as soon as it is."""
    if _AUTO in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def register() -> None:
    """Register the quantization config and quantizer with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.quantizers import auto
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class FlatQuantConfig(QuantizationConfigMixin):
        """The checkpoint's `quantization_config` block, kept as written (see docs/CHECKPOINT.md)."""

        def __init__(self, **kwargs):
            self.quant_method = layout.QUANT_METHOD
            self.block = {**kwargs, "quant_method": layout.QUANT_METHOD}

        @classmethod
        def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
            cfg = cls(**config_dict)
            return (cfg, kwargs) if return_unused_kwargs else cfg

        def to_dict(self):
            return copy.deepcopy(self.block)

        def to_diff_dict(self):
            return self.to_dict()

        def __getattr__(self, name):  # fields of the block read as attributes (w_bits, layout_version, ...)
            block = self.__dict__.get("block", {})
            if name in block:
                return block[name]
            raise AttributeError(name)

    class FlatQuantHfQuantizer(HfQuantizer):
        """Pre-quantized only: swaps the projections for the packed modules before the weights load."""

        requires_calibration = True

        def validate_environment(self, *args, **kwargs):
            if self.quantization_config.block.get("layout_version") != layout.LAYOUT_VERSION:
                from flatquant.errors import CheckpointError

                raise CheckpointError(f"unknown flatquant layout version "
                                      f"{self.quantization_config.block.get('layout_version')!r}")

        def _process_model_before_weight_loading(self, model, **kwargs):
            from flatquant.runtime.modules import convert_model

            convert_model(model, self.quantization_config.block, device="meta")
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from flatquant.runtime.kvcache import install_runtime

            model.config.use_cache = True
            install_runtime(model)
            return model

        def is_serializable(self):
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    if layout.QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(layout.QUANT_METHOD)(FlatQuantConfig)
    if layout.QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(layout.QUANT_METHOD)(FlatQuantHfQuantizer)
    _REGISTERED = True
