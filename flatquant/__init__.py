"""flatquant: W4A4KV4 quantization of Llama/Qwen-family LLMs with FlatQuant (ICML 2025).

    from flatquant import QuantConfig, quantize
    quantize(model, QuantConfig(w_bits=4, a_bits=4, kv_bits=4), method="quarot", calib=windows)
"""
from flatquant.api import quantize
from flatquant.config import CalibConfig, QuantConfig, calib_preset
from flatquant.errors import FlatQuantError
from flatquant.runtime import load_quantized, save_quantized

try:  # `quant_method: "flatquant"` checkpoints load through AutoModelForCausalLM.from_pretrained
    from flatquant.runtime import register as _register

    _register()
except ImportError:  # pragma: no cover - transformers without the quantizer registry
    pass

__all__ = ["CalibConfig", "FlatQuantError", "QuantConfig", "calib_preset", "load_quantized", "quantize",
           "save_quantized"]
__version__ = "0.1.0"
