"""llmq: weight-only quantization of Hugging Face causal LMs (GPTQ / RTN, int2-8 and NF4)."""
__version__ = "0.1.0"

from .config import CalibConfig, GPTQConfig, QuantPlan, QuantScheme, RowSplit  # noqa: E402
from .errors import LlmqError  # noqa: E402
from .qtensor import QuantizedWeight, RowSplitWeight  # noqa: E402
from .hf import LlmqConfig, compile_decoding  # noqa: E402  (registers quant_method "llmq" with transformers)


def __getattr__(name):  # heavy imports (transformers) only when used
    if name in ("load_quantized", "save_quantized", "fake_quantize"):
        from . import modeling

        return getattr(modeling, name)
    if name == "set_backend":
        from .nn import set_backend

        return set_backend
    if name in ("quantize",):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'llmq' has no attribute {name!r}")


__all__ = ["LlmqConfig", "QuantScheme", "GPTQConfig", "CalibConfig", "QuantPlan", "RowSplit", "QuantizedWeight",
           "RowSplitWeight", "LlmqError", "load_quantized", "save_quantized", "fake_quantize", "quantize", "set_backend",
           "compile_decoding"]  # fmt: skip
