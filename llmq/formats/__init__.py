"""Number formats. `grid(scheme)` returns the module implementing find_params / encode / decode."""
from types import ModuleType

from ..config import QuantScheme
from . import integer, nf4


def grid(scheme: QuantScheme) -> ModuleType:
    return nf4 if scheme.format == "nf4" else integer
