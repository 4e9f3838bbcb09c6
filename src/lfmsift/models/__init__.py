"""Models: named real models, loading, architecture adapters and tiny test models."""

from lfmsift.models.adapters import (
    SUPPORTED,
    UnsupportedModelError,
    describe,
    supported_model_types,
)
from lfmsift.models.load import ModelLoadError, load, parse_dtype
from lfmsift.models.zoo import NAMED_MODELS, ModelPackageMissingError, lfmsift_home, list_models

__all__ = [
    "SUPPORTED",
    "NAMED_MODELS",
    "ModelLoadError",
    "ModelPackageMissingError",
    "UnsupportedModelError",
    "describe",
    "lfmsift_home",
    "list_models",
    "load",
    "parse_dtype",
    "supported_model_types",
]
