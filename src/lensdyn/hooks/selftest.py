"""The self-test every model gets before its first capture: do the hook points hold what their names say?

A bridge can be wrong in ways no error shows: upstream has had bridges whose ``hook_attn_out``
held the residual-added state on some families, and attention-pattern hooks that never fire
under sdpa. Averaging such a tensor gives a number, a wrong one. So before the first capture on
a model, lensdyn runs one short prompt (its first ``SELF_TEST_TOKENS`` tokens) and checks:

- **hooks fired**: every hook point the layout reads (``lensdyn.layouts``) fired on every block;
- **decomposition**: the layout's identities, on every block (pre-norm and post-sublayer-norm:
  ``pre + attn_out == mid`` and ``mid + mlp_out == post``; parallel: ``pre + attn_out + mlp_out
  == post``; post-norm: ``LN2``'s input is ``mid + mlp_out`` and its output the next state);
- **Hugging Face equality**: where the bridge wraps Hugging Face layers, ``hook_resid_pre`` /
  ``hook_resid_post`` equal what the first, middle and last Hugging Face layer actually received
  and returned (plain PyTorch hooks on the wrapped modules, independent of TransformerLens' hook points).

A failure raises ``HookSemanticsError`` naming the model, block and hook. The result is kept per
model (``self_test(model)`` returns it; ``lensdyn models --check`` prints it). It costs one
forward pass of at most ``SELF_TEST_TOKENS`` tokens per model (``benchmarks/capture.py``).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from lensdyn.errors import HookSemanticsError
from lensdyn.fastpath import disagreement
from lensdyn.models import block_layout, model_info

SELF_TEST_TOKENS = 16
# Relative gap (lensdyn.fastpath.disagreement) allowed per parameter dtype: an identity that holds
# exactly leaves only the rounding of one addition; a wrong hook gives order one.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Check:
    """One check of the self-test: the worst relative gap found, where, and the tolerance."""

    name: str
    gap: float
    tolerance: float
    where: str

    @property
    def passed(self) -> bool:
        return self.gap <= self.tolerance


@dataclass(frozen=True)
class SelfTestReport:
    """Every check run on one model."""

    model: str
    layout: str
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def summary(self) -> str:
        lines = [f"self-test of {self.model} ({self.layout}): {'passed' if self.passed else 'FAILED'}"]
        for c in self.checks:
            found = (f"{int(c.gap)} never fired ({c.where})" if c.name == "hooks fired" and c.gap else
                     f"all fired" if c.name == "hooks fired" else f"worst gap {c.gap:.1e} (tolerance {c.tolerance:.0e}) at {c.where}")
            lines.append(f"  {'ok  ' if c.passed else 'FAIL'} {c.name:<32} {found}")
        return "\n".join(lines)


_REPORTS: "weakref.WeakKeyDictionary[object, SelfTestReport]" = weakref.WeakKeyDictionary()


def ensure_self_tested(model, tokens: list[int]) -> SelfTestReport:
    """The model's self-test, run on ``tokens[:SELF_TEST_TOKENS]`` the first time; raises on a failure."""
    report = _REPORTS.get(model)
    if report is None:
        report = self_test(model, tokens)
        try:
            _REPORTS[model] = report
        except TypeError:  # not weakly referenceable: test again next time
            pass
    if not report.passed:
        worst = next(c for c in report.checks if not c.passed)
        raise HookSemanticsError(
            f"{report.model}: the bridge's hook points fail lensdyn's self-test ({worst.name} at {worst.where}: "
            f"gap {worst.gap:.2g} > {worst.tolerance:g}); its numbers would be wrong, so lensdyn refuses this model"
        )
    return report


def self_test(model, tokens: list[int]) -> SelfTestReport:
    """Run the checks on one short prompt and return every result (no error here; ``ensure_self_tested`` raises)."""
    layout = block_layout(model)
    n = model.cfg.n_layers
    ids = torch.tensor([list(tokens)[:SELF_TEST_TOKENS]], device=next(model.parameters()).device)
    wanted = {f"blocks.{l}.{suffix}" for l in range(n) for suffix in ("hook_resid_pre", "hook_resid_post")}
    for l in range(n):
        hooks = layout.stream_hooks(l)
        wanted |= {hooks["attn_out"], hooks["mlp_out"], hooks.get("resid_mid", hooks["attn_out"])}
        if layout.name == "post-norm":
            wanted |= {f"blocks.{l}.ln2.hook_in", f"blocks.{l}.ln2.hook_out"}
    hook_names = set(model.hook_dict)  # built anew on every access: read it once
    missing = sorted(name for name in wanted if name not in hook_names)
    seen: dict[str, Tensor] = {}

    def keep(name: str):
        def hook_fn(x: Tensor, hook) -> Tensor:  # hook.name may be the bridge's own name for an alias
            seen[name] = x.detach().clone()
            return x

        return hook_fn

    hf_io, handles = _record_hf_layers(model, n)
    try:
        with torch.inference_mode():
            model.run_with_hooks(ids, fwd_hooks=[(name, keep(name)) for name in sorted(wanted) if name in hook_names])
    finally:
        for handle in handles:
            handle.remove()
    tolerance = TOLERANCE.get(next(model.parameters()).dtype, 1e-4)
    unfired = missing + sorted(name for name in wanted if name in hook_names and name not in seen)
    checks = [Check("hooks fired", float(len(unfired)), 0.0, ", ".join(unfired[:3]) or "every block")]
    if not unfired:
        checks.append(_decomposition(seen, layout, n, tolerance))
        if hf_io:
            checks.append(_hf_equality(seen, hf_io, tolerance))
    return SelfTestReport(model=model_info(model).name, layout=layout.describe(), checks=tuple(checks))


def _decomposition(seen: dict[str, Tensor], layout, n: int, tolerance: float) -> Check:
    """The worst gap of the layout's identities over every block."""
    worst, where = 0.0, "every block"
    for l in range(n):
        b = f"blocks.{l}"
        hooks = layout.stream_hooks(l)
        pre, post = seen[f"{b}.hook_resid_pre"], seen[f"{b}.hook_resid_post"]
        attn, mlp = seen[hooks["attn_out"]], seen[hooks["mlp_out"]]
        if layout.name == "post-norm":
            # attn_out is read as LN1's input minus the residual, so only LN2's side can be checked.
            pairs = [(seen[f"{b}.ln2.hook_in"], seen[hooks["resid_mid"]] + mlp, f"{b}.ln2.hook_in"),
                     (seen[f"{b}.ln2.hook_out"], post, f"{b}.hook_resid_post")]
        elif layout.sequential:
            mid = seen[hooks["resid_mid"]]
            pairs = [(pre + attn, mid, hooks["attn_out"]), (mid + mlp, post, hooks["mlp_out"])]
        else:
            pairs = [(pre + attn + mlp, post, f"{hooks['attn_out']} + {hooks['mlp_out']}")]
        if l + 1 < n:
            pairs.append((post, seen[f"blocks.{l + 1}.hook_resid_pre"], f"blocks.{l + 1}.hook_resid_pre"))
        for got, expected, name in pairs:
            gap = disagreement(got, expected)
            if gap > worst:
                worst, where = gap, name
    return Check(f"{layout.name} decomposition", worst, tolerance, where)


def _record_hf_layers(model, n: int):
    """Forward hooks on the Hugging Face layers the first, middle and last blocks wrap: ``({block: (in, out)}, handles)``."""
    io: dict[int, list[Tensor]] = {}
    handles = []
    for l in sorted({0, n // 2, n - 1}):
        layer = getattr(model.blocks[l], "original_component", None)
        if layer is None:
            continue

        def record(module, args, kwargs, output, l=l):
            hidden = args[0] if args else kwargs.get("hidden_states")
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(hidden, Tensor) and isinstance(out, Tensor):
                io[l] = [hidden.detach().clone(), out.detach().clone()]

        handles.append(layer.register_forward_hook(record, with_kwargs=True))
    return io, handles


def _hf_equality(seen: dict[str, Tensor], hf_io: dict[int, list[Tensor]], tolerance: float) -> Check:
    worst, where = 0.0, "the first, middle and last Hugging Face layer"
    for l, (hidden, out) in sorted(hf_io.items()):
        for got, expected, name in ((seen[f"blocks.{l}.hook_resid_pre"], hidden, f"blocks.{l}.hook_resid_pre"),
                                    (seen[f"blocks.{l}.hook_resid_post"], out, f"blocks.{l}.hook_resid_post")):
            gap = disagreement(got, expected.reshape(got.shape) if expected.numel() == got.numel() else expected)
            if gap > worst:
                worst, where = gap, name
    return Check("equals the Hugging Face layers", worst, tolerance, where)
