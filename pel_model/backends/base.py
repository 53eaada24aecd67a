"""Inference backend interface: uint8 RGB face crops -> fake logits."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..preprocess import validate_crops


class Backend(ABC):
    """One compiled or eager copy of the network on one device."""

    name: str = "backend"

    def __init__(self, input_size: int, device: str = "cpu", precision: str = "fp32"):
        self.input_size, self.device, self.precision = input_size, device, precision

    def logits(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N,) raw logits; raises ValueError on a bad batch."""
        validate_crops(crops, self.input_size)
        return np.asarray(self._run(np.ascontiguousarray(crops)), dtype=np.float32).reshape(-1)

    @abstractmethod
    def _run(self, crops: np.ndarray) -> np.ndarray: ...

    def describe(self) -> str:
        return f"{self.name}:{self.device}:{self.precision}"
