"""lensdyn: how token representations move through a transformer, layer by layer.

    import lensdyn as ld
    model = ld.load_model("smollm2-135m")                 # raw weights, eval mode, offline
    cap = ld.capture(model, "diverse")                    # one forward pass per batch
    cap.resid.shape                                       # [n_layers + 1, batch, pos, d_model]
"""
__version__ = "0.1.0"

import importlib
import warnings

# huggingface_hub imports tqdm.auto, which in a notebook without ipywidgets warns "IProgress not found"
# as it is imported; lensdyn draws no notebook bar (lensdyn.progress writes plain lines there).
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")

# Every public name and the module it lives in. Each is imported on first use (PEP 562), so that
# importing a core module (``lensdyn.results``, which runs this file first) imports none of the
# floors above it, and ``import lensdyn`` costs nothing until a name is used.
_EXPORTS = {
    **dict.fromkeys(("ArgumentError", "LensdynError", "MissingModelPackageError", "NonFiniteActivationError",
                     "PromptError", "PromptTooLongError", "UnknownModelError", "UnsupportedArchitectureError"),
                    "lensdyn.errors"),
    **dict.fromkeys(("STREAMS", "Capture", "capture"), "lensdyn.hooks.capture"),
    **dict.fromkeys(("DEFAULT_MODEL", "ModelInfo", "available_models", "load_model"), "lensdyn.models"),
    **dict.fromkeys(("PromptSet", "get_prompts", "load_prompts"), "lensdyn.prompts"),
    **dict.fromkeys(("Conventions", "Provenance", "Result"), "lensdyn.results"),
    "load_result": "lensdyn.analyses.registry",  # it imports every analysis first, so any result kind loads
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lensdyn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # bound once, as an eager import would have
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
