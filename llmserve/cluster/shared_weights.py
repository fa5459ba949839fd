"""Weights held once per host (BlitzScale's first idea): the first replica on a host loads and
converts the model, then puts every tensor of it in Ray's object store (shared memory on that host);
the other replicas map those tensors instead of loading and converting again. N replicas then cost
about one copy of the weights plus N KV caches.

The model is pickled with its tensors taken out (persistent ids): the small skeleton travels as
bytes, the tensors as numpy arrays, which Ray hands to every process on the host zero-copy
(read-only views of the same pages). The compiled kernels are not pickled: each process loads its own.
"""
from __future__ import annotations

import io
import pickle
from types import ModuleType

import numpy as np
import torch
from torch import nn


class _Out(pickle.Pickler):
    def __init__(self, file, arrays: list[np.ndarray]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.arrays = arrays
        self._seen: dict[int, int] = {}

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            bf16 = obj.dtype == torch.bfloat16  # numpy has no bfloat16: its bits travel as int16
            key = self._seen.get(id(obj))
            if key is None:  # one array per tensor, however many modules share it (a tied head)
                key = self._seen[id(obj)] = len(self.arrays)
                t = obj.detach().cpu()
                self.arrays.append((t.view(torch.int16) if bf16 else t).numpy())
            return ("tensor", key, bf16)
        if isinstance(obj, ModuleType):
            return ("module", obj.__name__)
        return None


class _In(pickle.Unpickler):
    def __init__(self, file, arrays: list[np.ndarray]) -> None:
        super().__init__(file)
        self.arrays = arrays
        self._made: dict[int, torch.Tensor] = {}

    def persistent_load(self, pid):
        kind = pid[0]
        if kind == "tensor":
            _, key, bf16 = pid
            if key not in self._made:
                # Shared pages are read-only; inference never writes a weight, so no copy is made.
                t = torch.from_numpy(self.arrays[key])
                self._made[key] = t.view(torch.bfloat16) if bf16 else t
            return self._made[key]
        if kind == "module":
            from llmserve.kernels import cpu_kernels

            return cpu_kernels()
        raise pickle.UnpicklingError("unknown persistent id")


def pack(model: nn.Module) -> tuple[bytes, list[np.ndarray]]:
    """The model's skeleton (bytes) and its tensors (numpy arrays, for the object store)."""
    arrays: list[np.ndarray] = []
    buf = io.BytesIO()
    _Out(buf, arrays).dump(model)
    return buf.getvalue(), arrays


def unpack(skeleton: bytes, arrays: list[np.ndarray]) -> nn.Module:
    with _warnings_quiet():
        return _In(io.BytesIO(skeleton), arrays).load()


class _warnings_quiet:
    """torch warns once per read-only array it wraps; these are meant to be read-only."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
