"""Keep the key/value cache reaching the attention, whichever keyword the installed versions use.

transformers 5.24 hands a decoder layer's cache to its attention module as ``cache=`` (with
``past_key_values=`` deprecated), while TransformerLens 4.3's attention bridges read only
``past_key_values`` / ``layer_past``. Without help, a cache built for a prefix reaches no
attention: it stays empty, and every cached row runs its tokens as if they began the sequence.
``route_cache_keyword`` adds one forward pre-hook per attention bridge that copies ``cache`` to
``past_key_values`` when only the former is given; with versions that already agree it is a no-op.
The fast paths that use a cache check themselves anyway (``lensdyn.fastpath``).
"""
from __future__ import annotations

import inspect

_ROUTED = "_lensdyn_cache_keyword_routed"


def route_cache_keyword(model) -> None:
    """Install (once per model) the ``cache=`` -> ``past_key_values=`` pre-hook on every attention bridge."""
    if getattr(model, _ROUTED, False):
        return
    for module in model.modules():
        if hasattr(module, "_update_kv_cache"):  # TransformerLens' attention bridges
            module.register_forward_pre_hook(_cache_as_past_key_values, with_kwargs=True)
    setattr(model, _ROUTED, True)


def _cache_as_past_key_values(module, args, kwargs):
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        kwargs["past_key_values"] = kwargs["cache"]
        return args, kwargs
    return None


def cache_keyword(module) -> str:
    """The keyword a Hugging Face module's ``forward`` takes its cache by: ``"cache"`` (5.24 on) or ``"past_key_values"``.

    A bridge component passes its keywords through to the module it wraps, so that module's signature decides.
    """
    module = getattr(module, "original_component", None) or module
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"
