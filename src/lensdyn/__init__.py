"""lensdyn: how token representations move through a transformer, layer by layer.

    import lensdyn as ld
    model = ld.load_model("smollm2-135m")                 # raw weights, eval mode, offline
    cap = ld.capture(model, "diverse")                    # one forward pass per batch
    cap.resid.shape                                       # [n_layers + 1, batch, pos, d_model]
"""
__version__ = "0.1.0"

from lensdyn.errors import (
    ArgumentError,
    LensdynError,
    MissingModelPackageError,
    NonFiniteActivationError,
    PromptError,
    PromptTooLongError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from lensdyn.hooks.capture import STREAMS, Capture, capture
from lensdyn.models import DEFAULT_MODEL, ModelInfo, available_models, load_model
from lensdyn.prompts import PromptSet, get_prompts, load_prompts
from lensdyn.results import Conventions, Provenance, Result, load_result

__all__ = [
    "__version__",
    "DEFAULT_MODEL",
    "STREAMS",
    "ArgumentError",
    "Capture",
    "Conventions",
    "LensdynError",
    "MissingModelPackageError",
    "ModelInfo",
    "NonFiniteActivationError",
    "PromptError",
    "PromptSet",
    "PromptTooLongError",
    "Provenance",
    "Result",
    "UnknownModelError",
    "UnsupportedArchitectureError",
    "available_models",
    "capture",
    "get_prompts",
    "load_model",
    "load_prompts",
    "load_result",
]
