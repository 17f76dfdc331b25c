"""A stand-in accelerator for machines without one: CPU tensors that obey CUDA's device rules.

``on_fake_device(t)`` marks a CPU tensor as living on another device; inside ``fake_device()`` every
torch call is checked as CUDA would check it and its outputs marked alike, while the numbers are
computed on the CPU as usual. What a CUDA run would refuse is refused here, with the call named:

- an op mixing a marked tensor with an unmarked one that is not a 0-dim scalar (a CPU scalar is
  allowed on CUDA; the reverse is not), except a CPU index into a marked tensor (``x[cpu_mask]``);
- ``.numpy()`` / ``np.asarray`` of a marked tensor (``Tensor.numpy`` refuses CUDA tensors).

``.cpu()`` and ``.to("cpu")`` unmark; ``x.device`` of a marked tensor reads ``meta``, and a tensor made
or moved there (``torch.zeros(..., device=x.device)``, ``y.to(x.device)``) is a marked CPU tensor.
Every read of a marked value into Python (``.item()``, ``float()``, ``bool()``, ``.tolist()``) is a host
sync on a GPU, and so is every op whose output size depends on the data (``nonzero``, ``unique``, a
boolean mask on the device as an index): they are counted in ``FakeDevice.syncs``.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("cuda", 0)  # what marked tensors report, so that code reads them as CUDA tensors
CPU = torch.device("cpu")


class DeviceMixError(RuntimeError):
    """What CUDA would raise: tensors on two devices in one op, or a device tensor read as numpy."""


class OnFakeDevice(torch.Tensor):
    """A CPU tensor standing for one on the fake device (it runs no torch function of its own)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self) -> torch.device:
        return FAKE


class _FakeParameter(OnFakeDevice, torch.nn.Parameter):
    """A parameter of a model on the fake device."""


def on_fake_device(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(OnFakeDevice)


def _mark(out):
    return tree_map(lambda t: on_fake_device(t) if type(t) is torch.Tensor else t, out)


def _unmark(out):
    return tree_map(lambda t: t.as_subclass(torch.Tensor) if isinstance(t, OnFakeDevice) else t, out)


def _is_fake(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"


def _is_cpu(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"


def fake_device_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its parameters and buffers marked in place: a model "on" the fake device."""
    for p in model.parameters():
        p.__class__ = _FakeParameter
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = on_fake_device(buffer)
    return model


SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.__index__, torch.nonzero, torch.Tensor.nonzero, torch.unique, torch.Tensor.unique,
         torch.masked_select, torch.Tensor.masked_select, torch.argwhere}
NUMPY = {torch.Tensor.numpy, torch.Tensor.__array__}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


class FakeDevice(TorchFunctionMode):
    """Inside it, marked tensors behave as CUDA tensors would (module docstring)."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        marked = any(isinstance(x, OnFakeDevice) for x in leaves)
        if func in NUMPY and marked:
            raise DeviceMixError(f"{func.__name__}() of a tensor on the device: move it to the CPU first")
        if marked and (func in SYNCS or (func in INDEXING and any(
                isinstance(i, OnFakeDevice) and i.dtype == torch.bool for i in tree_flatten(args[1])[0]))):
            self.syncs += 1
        if marked:
            self._check_one_device(func, args, kwargs)
        moves = func is torch.Tensor.to
        devices = [a for a in args if isinstance(a, torch.device) or (moves and isinstance(a, str))]
        devices += [kwargs["device"]] if kwargs.get("device") is not None else []
        if moves:
            devices += [a.device for a in args[1:2] if isinstance(a, torch.Tensor)]  # x.to(other)
        to_fake = any(_is_fake(d) for d in devices)
        to_cpu = func is torch.Tensor.cpu or (moves and any(_is_cpu(d) for d in devices))
        if to_fake:
            args = tuple(CPU if (isinstance(a, torch.device) or (moves and isinstance(a, str))) and _is_fake(a) else a
                         for a in args)
            kwargs = {k: CPU if k == "device" and _is_fake(v) else v for k, v in kwargs.items()}
        out = func(*_unmark(args), **_unmark(kwargs))
        if to_cpu:
            return out
        if func in INDEXING and func is torch.Tensor.__setitem__:
            return out
        return _mark(out) if marked or to_fake else out

    @staticmethod
    def _check_one_device(func, args, kwargs) -> None:
        if func in INDEXING:
            target, index = args[0], args[1]
            indices = [x for x in tree_flatten(index)[0] if isinstance(x, torch.Tensor)]
            if not isinstance(target, OnFakeDevice) and any(isinstance(x, OnFakeDevice) for x in indices):
                raise DeviceMixError(f"{func.__name__}: a CPU tensor indexed by a device tensor")
            value = args[2] if func is torch.Tensor.__setitem__ else None
            if isinstance(value, torch.Tensor) and isinstance(target, OnFakeDevice) != isinstance(value, OnFakeDevice) \
                    and value.dim() > 0:
                raise DeviceMixError(f"{func.__name__}: values on another device than the tensor written")
            return
        if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.type_as):
            return
        leaves = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        cpu = [x for x in leaves if not isinstance(x, OnFakeDevice) and x.dim() > 0]
        if cpu:
            name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
            raise DeviceMixError(f"{name}: a device tensor with a CPU tensor of shape {tuple(cpu[0].shape)}")
