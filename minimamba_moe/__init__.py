"""minimamba-moe: minimal, readable, verified Mamba + Mixture-of-Experts language models.

    from minimamba_moe import ModelConfig, Model
    model = Model(ModelConfig.from_preset("tiny"))

The kernels live in two sibling packages with identical signatures:
``minimamba_moe.reference`` (plain PyTorch, obviously correct) and ``minimamba_moe.fast``. In the
checkout they are the top-level folders reference/ and fast/; the install maps them into this
package (``[tool.setuptools.package-dir]`` in pyproject.toml), so ``pip install -e .`` is needed
to import them. train.py, sample.py and tests/ are not part of the package.
"""

from .config import PRESETS, ConfigError, ModelConfig
from .model import InferenceState, Model, ModelOutput, ParamCount, count_params
from .moe import RouterStats

__all__ = [
    "PRESETS", "ConfigError", "ModelConfig", "Model", "ModelOutput", "InferenceState", "ParamCount",
    "RouterStats", "count_params",
]
