"""A simulated accelerator for device checks on a CPU-only machine (``SimulatedDevice``)."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], (torch.Tensor, list, tuple)):
        return [t for item in obj for t in _tensors(item)]  # not .tolist() results
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


class SimulatedDevice(TorchFunctionMode):
    """CPU tensors that behave, for device checks, as if on an accelerator.

    The given inputs, and every tensor computed from them, are "on the device":
    their ``.device`` reads ``meta`` inside the mode, and a tensor created with that
    device (``torch.zeros(..., device=x.device)``) is made on the CPU but counts as
    on the device. An operation mixing tensors on the device with other tensors of
    one or more dimensions is what CUDA refuses ("Expected all tensors to be on the
    same device"): it is recorded in ``mixed``. So a buffer created on a fixed
    device shows up, although everything runs on the CPU.
    """

    FAKE = torch.device("meta")

    def __init__(self, inputs: list[torch.Tensor]):
        super().__init__()
        self.mixed: list[str] = []
        for tensor in inputs:
            self._mark(tensor)

    @staticmethod
    def _mark(tensor: torch.Tensor) -> None:
        tensor._on_simulated_device = True

    @staticmethod
    def on_device(tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` counts as on the simulated device."""
        return getattr(tensor, "_on_simulated_device", False)

    def _swap_device(self, obj):
        """``obj`` with the fake device replaced by the CPU; whether it held one."""
        if obj == self.FAKE or obj == "meta":
            return torch.device("cpu"), True
        if isinstance(obj, (list, tuple)):
            swapped = [self._swap_device(item) for item in obj]
            return type(obj)(s for s, _ in swapped), any(f for _, f in swapped)
        return obj, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is torch.Tensor.device:  # the .device getter
            return self.FAKE if self.on_device(args[0]) else func(*args, **kwargs)
        args, fake_arg = self._swap_device(args)
        swapped = {k: self._swap_device(v) for k, v in kwargs.items()}
        kwargs = {k: v for k, (v, _) in swapped.items()}
        fake = fake_arg or any(f for _, f in swapped.values())
        inputs = _tensors(args) + _tensors(kwargs)
        marked = [t for t in inputs if self.on_device(t)]
        elsewhere = [t for t in inputs if not self.on_device(t) and t.dim() > 0]
        if marked and elsewhere:
            self.mixed.append(getattr(func, "__name__", repr(func)))
        result = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        moved_off = name == "cpu" or ("device" in kwargs and not fake)
        if moved_off and isinstance(result, torch.Tensor) and self.on_device(result):
            return result.view(result.shape)  # .cpu() of a CPU tensor returns itself
        if (marked or fake) and not moved_off:
            for tensor in _tensors(result):
                self._mark(tensor)
        return result
