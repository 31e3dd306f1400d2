"""flatquant: W4A4KV4 quantization of Llama/Qwen-family LLMs with FlatQuant (ICML 2025).

    from flatquant import QuaRotConfig, quantize
    quantize(model, QuaRotConfig(w_bits=4, a_bits=4, kv_bits=4), calib=windows)
"""
from flatquant.api import quantize, quantize_with_report
from flatquant.config import (
    CalibConfig,
    FlatQuantConfig,
    FP16Config,
    QuantConfig,
    QuaRotConfig,
    RTNConfig,
    SmoothQuantConfig,
    calib_preset,
    method_config,
)
from flatquant.errors import FlatQuantError
from flatquant.methods.flatquant import load_calibrated
from flatquant.runtime.hf import register_when_imported

register_when_imported()  # `quant_method: "flatquant"` folders load through AutoModelForCausalLM.from_pretrained


def __getattr__(name: str):  # the packed runtime (and the kernels it needs) loads on first use
    if name in ("save_quantized", "load_quantized"):
        from flatquant import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'flatquant' has no attribute {name!r}")


__all__ = ["CalibConfig", "FP16Config", "FlatQuantConfig", "FlatQuantError", "QuaRotConfig", "QuantConfig",
           "RTNConfig", "SmoothQuantConfig", "calib_preset", "load_calibrated", "load_quantized", "method_config",
           "quantize", "quantize_with_report", "save_quantized"]
__version__ = "0.1.0"
