"""llmq: weight-only quantization of Hugging Face causal LMs (GPTQ / RTN; integer grids and codebooks).

`import llmq` registers quant_method "llmq" with transformers (llmq/hf.py), so that `from_pretrained` loads llmq
checkpoints and `LlmqConfig` quantizes at load time.
"""
from .version import __version__
from .config import CalibConfig, GPTQConfig, MixedConfig, QuantPlan, QuantScheme, RowSplit
from .errors import LlmqError
from .qtensor import QuantizedWeight, RowSplitWeight
from .hf import LlmqConfig, compile_decoding
from .modeling import fake_quantize, load_quantized, save_quantized
from .nn import set_backend
from .pipeline import quantize
from .rotation import rotate_model
from .exporters import export

__all__ = ["__version__", "LlmqConfig", "QuantScheme", "GPTQConfig", "CalibConfig", "MixedConfig", "QuantPlan",
           "RowSplit", "QuantizedWeight", "RowSplitWeight", "LlmqError", "load_quantized", "save_quantized",
           "fake_quantize", "quantize", "rotate_model", "export", "set_backend", "compile_decoding"]  # fmt: skip
