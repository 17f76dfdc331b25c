"""The path every analysis's ``measure()`` shares: a Capture or a model, then the untrained control.

    result = measure_with_control("expansion", capture_or_model, prompts, STREAMS, measure_one,
                                  model=model, control=control, needs_model="the causal metric reads W_U")

``measure_one(capture, model)`` measures one capture; ``measure_control`` (default: the same)
measures the control's capture, taken from the same prompts with the same exclusions by
``control_capture``. ``control`` is ``"random"``, a result of the same kind, or None
(``results.attach_control``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from lensdyn.errors import ArgumentError
from lensdyn.hooks.capture import Capture, capture_for, control_capture
from lensdyn.results import Result, attach_control


def measure_with_control(
    analysis: str,
    capture_or_model,
    prompts,
    streams: Sequence[str],
    measure_one: Callable[[Capture, object], Result],
    *,
    model=None,
    control="random",
    needs_model: str = "",
    measure_control: Callable[[Capture, object], Result] | None = None,
    **capture_kwargs,
) -> Result:
    """Capture (unless given a Capture), measure, and attach the control (module docstring).

    ``needs_model``: why the analysis needs the model even when given a Capture ("" if it does not).
    """
    cap, captured_from = capture_for(capture_or_model, prompts, streams, **capture_kwargs)
    model = captured_from if captured_from is not None else model
    if model is None and needs_model:
        raise ArgumentError(f"{analysis}.measure(capture) needs model= too: {needs_model}")
    result = measure_one(cap, model)

    def measure_random() -> Result:
        if model is None:
            raise ArgumentError(f"{analysis}: control='random' with a capture needs model= (the model it came from); "
                                "or pass control=None")
        control_cap, random_model = control_capture(model, cap, streams)
        return (measure_control or measure_one)(control_cap, random_model)

    return attach_control(result, control, measure_random)
