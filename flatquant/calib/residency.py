"""Accounting of what a calibration keeps on its compute device, measurable on the CPU.

`DeviceResidency` is a TorchDispatchMode that sees every tensor an operator creates while it is active
and keeps the live bytes of their storages (peak and largest single storage). Host buffers (the
activation sets kept in pinned memory or a disk memmap, see `host_buffers`) are not on the compute device
and are left out, so on the CPU the tracker measures what a GPU run would hold on the GPU: the layer, its
training state and one mini-batch of activations, never a whole activation set.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ACTIVE: list[DeviceResidency] = []


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return None
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


class DeviceResidency(TorchDispatchMode):
    """Live bytes of the tensors created by operators (host buffers excluded): `peak`, `largest`."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}  # storage pointer -> bytes
        self.host: set[int] = set()
        self.now = self.peak = self.largest = 0
        self._suspended = 0

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def _forget(self, ptr: int) -> None:
        self.now -= self.live.pop(ptr, 0)

    def _host(self, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.host:
            self.host.add(ptr)
            self._forget(ptr)
            weakref.finalize(t.untyped_storage(), self.host.discard, ptr)

    def _see(self, t: torch.Tensor) -> None:
        info = _storage(t)
        if info is None or info[1] == 0:
            return
        ptr, nbytes = info
        if self._suspended:
            self._host(t)
            return
        if ptr in self.host or ptr in self.live:
            return
        self.live[ptr] = nbytes
        self.now += nbytes
        self.peak, self.largest = max(self.peak, self.now), max(self.largest, nbytes)
        weakref.finalize(t.untyped_storage(), self._forget, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._see(t)
        return out


@contextlib.contextmanager
def host_buffers():
    """Tensors created inside are host buffers (activation sets off the compute device): not accounted."""
    for r in _ACTIVE:
        r._suspended += 1
    try:
        yield
    finally:
        for r in _ACTIVE:
            r._suspended -= 1

