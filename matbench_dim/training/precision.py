"""Mixed precision for the training loops: bf16 or fp16 autocast on CUDA, float32 on CPU.

:func:`mixed_precision` picks, for a device and a ``precision`` setting:

- ``"auto"`` (the estimator's default): on CUDA, bf16 autocast where the GPU supports it
  (Ampere and newer), else fp16 autocast with a gradient scaler; on CPU, float32 (CPU autocast
  is slower than float32 matmuls on the machines this package is developed on, and changes
  results);
- ``"fp32"``: float32 everywhere; ``"bf16"`` / ``"fp16"``: that autocast dtype on any device
  (fp16 always with a scaler).

The loops use the returned :class:`MixedPrecision` as ``with amp.autocast(): loss = ...``,
``amp.backward(loss)``, ``amp.unscale(optimizers)`` (before gradient clipping, so clipping
sees true gradients) and ``amp.step(optimizers)``. Host-to-device copies of a batch are
pinned and non-blocking on CUDA (:func:`to_device`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PRECISIONS", "MixedPrecision", "mixed_precision", "to_device"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class MixedPrecision:
    """Autocast dtype (``None``: float32) and gradient scaler (fp16 only) for one device."""

    device_type: str
    dtype: torch.dtype | None = None
    scaler: Any = None

    @property
    def name(self) -> str:
        """``"fp32"``, ``"bf16"`` or ``"fp16"``."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Forward passes inside run in the autocast dtype (nothing changes for float32)."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled under fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Unscale fp16 gradients in place (call before clipping them)."""
        if self.scaler is not None:
            for opt in optimizers:
                self.scaler.unscale_(opt)

    def step(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Step every optimiser (the scaler skips steps with inf/NaN gradients under fp16)."""
        if self.scaler is None:
            for opt in optimizers:
                opt.step()
            return
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()


def mixed_precision(device: torch.device | str, precision: str = "auto") -> MixedPrecision:
    """The :class:`MixedPrecision` for ``device`` under ``precision`` (see the module doc)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    kind = device.type
    if precision == "fp32" or (precision == "auto" and kind != "cuda"):
        return MixedPrecision(kind)
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "bf16":
        return MixedPrecision(kind, torch.bfloat16)
    return MixedPrecision(kind, torch.float16, torch.amp.GradScaler(kind))


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch.to(device)``; on CUDA through pinned memory with a non-blocking copy."""
    device = torch.device(device)
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)
