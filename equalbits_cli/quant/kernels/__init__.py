"""GPU kernels (Triton), each with a pure-torch fallback in the module that calls it.

Exactness is tested on the CPU with ``TRITON_INTERPRET=1`` against the torch reference.
"""

from __future__ import annotations

import functools
import os

__all__ = ["triton_usable"]


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # an absent or broken install: the torch path serves instead
        return False
    return True


def triton_usable(device_type: str) -> bool:
    """Whether the Triton kernels can run on tensors of ``device_type``: on CUDA with Triton installed,
    or anywhere under ``TRITON_INTERPRET=1`` (the tests). ``EQUALBITS_NO_TRITON=1`` turns them off."""
    if os.environ.get("EQUALBITS_NO_TRITON", "") not in ("", "0"):
        return False
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET", "") in ("", "0"):
        return False
    return _triton_importable()
