"""unweight: measure and remove the redundancy in LLM weights, and prove what each removal costs."""

from unweight import hf  # noqa: F401  registers the unweight-* quant methods with transformers (cheap: imports neither)
from unweight.errors import UnweightError

__version__ = "0.1.0"
__all__ = ["UnweightError", "__version__"]
