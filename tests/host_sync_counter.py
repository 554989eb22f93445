"""A CPU stand-in for CUDA's sync debug mode: the torch calls that would make the host wait for the device.

On a CPU every tensor lives on the host, so the counter tells the two apart itself, from how
the code names devices: a device given as a string ("cpu") means the host, a `torch.device`
object means the code's own device (the step's `self.device`, `t.device`). A *host tensor* is
one the checked code makes on the host: a factory call with no `device=` or `device="cpu"`, a
copy to the host (`.cpu()`, `.to("cpu")`), or an operation on host tensors only. Every other
tensor (parameters, buffers, the batch, what is computed from them) stands for a *device
tensor*. A call is counted when it would synchronise on a GPU:

- it reads a device tensor's values on the host: `.item()`, `.tolist()`, `.numpy()`, `bool()`,
  `int()`, `float()`, `np.asarray(t)` (`__array__`), formatting or printing (`f"{t:.2f}"`,
  `repr`), `x in t`, `torch.equal`, `torch.tensor([t, ...])`;
- it copies a device tensor to the host: `.cpu()`, `.to("cpu")`, `.to(host_tensor)`,
  `host.copy_(t)`, `host[i] = t`;
- its output's shape depends on a device tensor's values: `nonzero`, `unique`, `masked_select`,
  one-argument `where`, boolean-mask indexing, ...

What it cannot tell: a copy to `torch.device("cpu")` written as an object (taken for the
code's own device); a host buffer made before the counter started (taken for a device tensor,
so a copy into it is missed and a read of it counted); `torch.from_numpy` (no torch function,
so its tensor counts as a device tensor); reads inside C++ (a custom operator). The GPU test
under `torch.cuda.set_sync_debug_mode("error")` is the reference; this counter makes the same
check on every CPU run.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

# reads of a tensor's values on the host
READS = {
    "item",
    "tolist",
    "numpy",
    "__bool__",
    "__int__",
    "__float__",
    "__complex__",
    "__index__",
    "__array__",
    "__format__",
    "__repr__",
    "__contains__",
    "equal",
    "allclose",
    "is_nonzero",
    "tensor",  # torch.tensor([t0, t1]) reads each value
}
# calls whose output's shape depends on the values
VALUE_SHAPED = {
    "nonzero",
    "argwhere",
    "unique",
    "unique_consecutive",
    "masked_select",
    "repeat_interleave",
    "bincount",
}
# checks whose CUDA branch is asynchronous (torch._assert_async); their CPU branch may sync
ASYNC_ON_CUDA = {"_check_labels", "positions_in"}


class HostSyncCounter(TorchFunctionMode):
    """Records the name of every torch call that would synchronise a CUDA device with the host."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self._host: dict[int, weakref.ref[torch.Tensor]] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if not _called_from(ASYNC_ON_CUDA) and self._synchronises(name, args, kwargs):
            self.calls.append(name)
        result = func(*args, **kwargs)
        if self._makes_host_tensors(name, args, kwargs):
            for tensor in _tensors(result):
                self._host[id(tensor)] = weakref.ref(tensor)
        return result

    def is_host(self, tensor: torch.Tensor) -> bool:
        """The tensor was made on the host by the code under the counter."""
        known = self._host.get(id(tensor))
        return known is not None and known() is tensor

    def _on_device(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and not self.is_host(value)

    def _synchronises(self, name: str, args: tuple, kwargs: dict) -> bool:
        source = args[0] if args else None
        if name in READS or name in VALUE_SHAPED or name == "cpu":
            return any(self._on_device(t) for t in _tensors((args, kwargs)))
        if name == "where":
            return len(args) + len(kwargs) == 1 and self._on_device(source)
        if name == "to":
            return self._on_device(source) and self._to_host(_destination(args, kwargs))
        if name == "copy_":
            return self.is_host(source) and self._on_device(args[1] if len(args) > 1 else kwargs.get("src"))
        if name in ("__getitem__", "__setitem__"):
            masks = _bool_masks(args[1:2])
            if masks and any(self._on_device(t) for t in (source, *masks)):
                return True
            return name == "__setitem__" and self.is_host(source) and self._on_device(args[2])
        return False

    def _to_host(self, destination: torch.Tensor | str | torch.device | None) -> bool:
        """A copy to `destination` lands on the host (a `torch.device` is the code's own device)."""
        if isinstance(destination, torch.Tensor):
            return self.is_host(destination)
        return isinstance(destination, str) and torch.device(destination).type == "cpu"

    def _makes_host_tensors(self, name: str, args: tuple, kwargs: dict) -> bool:
        if name == "cpu":
            return True
        if name == "to":
            destination = _destination(args, kwargs)
            return self._to_host(destination) if destination is not None else self.is_host(args[0])
        inputs = list(_tensors((args, kwargs)))
        if inputs:
            return all(self.is_host(t) for t in inputs)
        device = kwargs.get("device")  # a factory: torch.zeros(3), torch.tensor([1.0]), ...
        return device is None or self._to_host(device)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _destination(args: tuple, kwargs: dict) -> torch.Tensor | str | torch.device | None:
    """Where `Tensor.to(...)` copies to: a tensor (its device), a device, or None (a dtype only)."""
    for value in (kwargs.get("device"), kwargs.get("other"), *args[1:2]):
        if isinstance(value, torch.Tensor | str | torch.device):
            return value
    return None


def _called_from(functions: set[str], depth: int = 6) -> bool:
    frame = sys._getframe(2)  # the code that made the torch call
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name in functions:
            return True
        frame = frame.f_back
    return False


def _bool_masks(index: tuple) -> list[torch.Tensor]:
    items = index[0] if index and isinstance(index[0], tuple) else index
    return [i for i in items if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
