"""Errors lensdyn raises on bad input.

Every one of them is a ``LensdynError`` and carries a one-line reason, so the CLI can
print it and exit with status 2, and a notebook user sees what to change.
"""
from __future__ import annotations


class LensdynError(Exception):
    """Bad input or an unsupported situation; the message says what to do."""


class ArgumentError(LensdynError, ValueError):
    """An argument outside the values a function accepts."""


class UnknownModelError(LensdynError, ValueError):
    """A model name that is neither embedded, a local directory, nor reachable on the hub."""


class MissingModelPackageError(LensdynError, ImportError):
    """An embedded model whose weight package is not installed."""


class UnsupportedArchitectureError(LensdynError, ValueError):
    """A model TransformerLens (or lensdyn) cannot hook the way an analysis needs."""


class HookSemanticsError(UnsupportedArchitectureError):
    """A hook point that does not hold what its name says, or never fired (``lensdyn.hooks.selftest``)."""


class PromptError(LensdynError, ValueError):
    """An empty prompt set, an empty prompt, or a file that holds no prompts."""


class PromptTooLongError(PromptError):
    """A prompt longer than the model's context, with truncation not asked for."""


class NonFiniteActivationError(LensdynError, FloatingPointError):
    """NaN or inf in an activation; the message names the hook and layer where it first appears."""

    def __init__(self, hook_name: str, n_bad: int, prompt_indices: list[int]):
        self.hook_name = hook_name
        self.n_bad = n_bad
        self.prompt_indices = prompt_indices
        super().__init__(
            f"non-finite activations at {hook_name} (layer {_layer_of(hook_name)}): "
            f"{n_bad} NaN/inf values in prompt(s) {prompt_indices}"
        )


def _layer_of(hook_name: str) -> str:
    parts = hook_name.split(".")
    return parts[1] if parts[0] == "blocks" and len(parts) > 1 else "-"
