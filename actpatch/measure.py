"""What autograd really keeps: the yardstick the projection is checked against (tests, benchmarks, users)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def saved_bytes(model: nn.Module, kwargs: dict, args: tuple = ()) -> tuple[int, Any]:
    """(bytes of the unique storages autograd saves in ``model(*args, **kwargs)``, parameters and buffers
    excluded, and the model's output).  Storages are counted once however many ops save them."""
    params = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*args, **kwargs)
    return sum(storages.values()), out
