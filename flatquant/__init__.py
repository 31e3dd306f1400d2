"""flatquant: W4A4KV4 quantization of Llama/Qwen-family LLMs with FlatQuant (ICML 2025).

    from flatquant import QuantConfig, quantize
    quantize(model, QuantConfig(w_bits=4, a_bits=4, kv_bits=4), method="quarot", calib=windows)
"""
from flatquant.api import quantize
from flatquant.config import CalibConfig, QuantConfig, calib_preset
from flatquant.errors import FlatQuantError
from flatquant.runtime.hf import register_when_imported

register_when_imported()  # `quant_method: "flatquant"` folders load through AutoModelForCausalLM.from_pretrained


def __getattr__(name: str):  # the packed runtime (and the kernels it needs) loads on first use
    if name in ("save_quantized", "load_quantized"):
        from flatquant import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'flatquant' has no attribute {name!r}")

__all__ = ["CalibConfig", "FlatQuantError", "QuantConfig", "calib_preset", "load_quantized", "quantize",
           "save_quantized"]
__version__ = "0.1.0"
