"""The quantization building blocks every method shares: one quantizer, the transforms, the quantized modules."""
