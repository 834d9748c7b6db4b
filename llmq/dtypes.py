"""Float dtypes by the names configs and files use ("float16", "bfloat16", "float32")."""
from __future__ import annotations

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_NAMES = tuple(DTYPES)
