"""Launching a Triton kernel on the device of its tensors.

``kernel[grid](...)`` launches on the *current* CUDA device.  A model spread over GPUs in one process
(``from_pretrained(device_map=...)``, accelerate's ``dispatch_model``) keeps a layer's tensors on another
device than the current one, so a launch for tensors elsewhere runs under their device's guard.
"""

from __future__ import annotations

import torch


def launch(kernel, programs: int, args: tuple, kwargs: dict, num_warps: int) -> None:
    """``kernel[(programs,)](*args, **kwargs, num_warps=num_warps)`` on the device of ``args[0]`` (a
    tensor); Triton's interpreter (any device) launches as it is."""
    device = args[0].get_device()
    if device >= 0 and device != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel[(programs,)](*args, **kwargs, num_warps=num_warps)
    else:
        kernel[(programs,)](*args, **kwargs, num_warps=num_warps)
