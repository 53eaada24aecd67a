"""Where compiled TensorRT engines live, and when one may be reused.

An engine is only valid for the TensorRT version, GPU architecture (compute capability) and OS
that built it, and for one graph, precision and batch profile. All of these go into the cache key,
so a change to any of them means a new file instead of a silently wrong or unloadable engine.
The timing cache (kernel timings, reusable across models) is keyed by TensorRT version and GPU.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def validate_profile(profile: tuple[int, int, int]) -> tuple[int, int, int]:
    """(min, opt, max) batch sizes of the optimisation profile; 1 <= min <= opt <= max."""
    if len(profile) != 3 or not all(isinstance(b, int) for b in profile):
        raise ValueError(f"profile must be three integers (min, opt, max), got {profile!r}")
    lo, opt, hi = profile
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"profile needs 1 <= min <= opt <= max, got {profile}")
    return lo, opt, hi


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on."""

    model_sha256: str
    precision: str
    input_size: int
    profile: tuple[int, int, int]
    tensorrt_version: str
    compute_capability: tuple[int, int]
    os: str = f"{platform.system()}-{platform.machine()}"
    calibration_sha256: str | None = None  # INT8: the calibration crops shape the Q/DQ scales
    float_layers: tuple[str, ...] = ()  # INT8: weight-name prefixes of layers kept in float

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.input_size < 1:
            raise ValueError(f"input_size must be positive, got {self.input_size}")
        validate_profile(self.profile)
        if self.precision == "int8" and not self.calibration_sha256:
            raise ValueError("an INT8 engine key needs the calibration data's hash")

    def digest(self) -> str:
        """16 hex characters of SHA-256 over the canonical JSON of all fields."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def engine_name(self) -> str:
        lo, opt, hi = self.profile
        return (f"pel-{self.precision}-{self.input_size}px-b{lo}-{opt}-{hi}"
                f"-trt{self.tensorrt_version}-sm{self.compute_capability[0]}{self.compute_capability[1]}"
                f"-{self.digest()}.engine")

    def timing_cache_name(self) -> str:
        cc = self.compute_capability
        return f"timing-trt{self.tensorrt_version}-sm{cc[0]}{cc[1]}-{self.os}.cache"


def engine_cache_key(model_sha256: str, precision: str, input_size: int,
                     profile: tuple[int, int, int], tensorrt_version: str,
                     compute_capability: tuple[int, int],
                     calibration_sha256: str | None = None, float_layers: tuple[str, ...] = ()) -> str:
    """The cache key (a hex digest) of one engine; a pure function of its arguments and the OS."""
    return EngineKey(model_sha256, precision, input_size, tuple(profile), tensorrt_version,
                     tuple(compute_capability), calibration_sha256=calibration_sha256,
                     float_layers=tuple(float_layers)).digest()


def crops_sha256(crops) -> str:
    """Hash of a calibration array (shape, dtype and bytes)."""
    h = hashlib.sha256(f"{crops.shape}|{crops.dtype}".encode())
    h.update(memoryview(crops.tobytes()))
    return h.hexdigest()
