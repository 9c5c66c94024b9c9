"""minimamba-moe: minimal, readable, verified Mamba + Mixture-of-Experts language models.

    from minimamba_moe import ModelConfig, Model
    model = Model(ModelConfig.from_preset("tiny"))

The kernels live in two sibling packages with identical signatures:
``minimamba_moe.reference`` (plain PyTorch, obviously correct) and ``minimamba_moe.fast``.
"""

import os as _os

# In a source checkout, reference/ and fast/ sit beside this folder; an install maps them to
# minimamba_moe.reference / minimamba_moe.fast (see [tool.setuptools.package-dir] in pyproject.toml).
# Adding the checkout root to this package's search path makes both layouts import the same way.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "reference", "__init__.py")) and not _os.path.isdir(
    _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "reference")
):
    __path__.append(_root)  # noqa: F821  (__path__ is defined for packages)

from .config import PRESETS, ConfigError, ModelConfig  # noqa: E402
from .model import InferenceState, Model, ModelOutput, ParamCount, count_params  # noqa: E402
from .moe import RouterStats  # noqa: E402

__all__ = [
    "PRESETS", "ConfigError", "ModelConfig", "Model", "ModelOutput", "InferenceState", "ParamCount",
    "RouterStats", "count_params",
]
