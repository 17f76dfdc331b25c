"""lensdyn.hooks: everything that touches TransformerLens hook points.

Hooks read and write activations; they never compute statistics (that is ``lensdyn.analyses``).
"""
from lensdyn.hooks.capture import STREAMS, Capture, capture
from lensdyn.hooks.external import from_activation_cache, from_hidden_states
from lensdyn.hooks.circuits import (
    CircuitSpectra,
    circuit_spectra,
    layer_ov_circuit,
    ov_circuits,
    value_matrix,
)
from lensdyn.hooks.steering import steered_last_logits, steering, steering_hooks

__all__ = [
    "STREAMS",
    "Capture",
    "capture",
    "from_activation_cache",
    "from_hidden_states",
    "CircuitSpectra",
    "circuit_spectra",
    "layer_ov_circuit",
    "ov_circuits",
    "value_matrix",
    "steering",
    "steering_hooks",
    "steered_last_logits",
]
