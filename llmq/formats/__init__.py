"""Number formats. `grid(scheme)` returns the module implementing find_params / encode / decode."""
from types import ModuleType

from ..config import NF_BITS, QuantScheme
from . import integer, nf


def grid(scheme: QuantScheme) -> ModuleType:
    return nf if scheme.format in NF_BITS else integer
