"""lfmsift: compute and fetch only what the current context needs.

Online structural pruning of FFN channels (POP) and streaming KV-cache retrieval (ReSV, V-Rex) for
Hugging Face models. Start with ``model, tokenizer = lfmsift.load("smollm2-135m")``.
"""

from lfmsift import prune
from lfmsift.models import load

__version__ = "0.1.0"
__all__ = ["load", "prune", "__version__"]
