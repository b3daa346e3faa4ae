"""What the machine can do: the device to compute on, the CPU's name, its vector ISA, and whether
bf16 is native.

:func:`resolve_device` is the one place a device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``)
becomes a :class:`torch.device`: ``auto`` is the GPU when torch sees one, else the CPU; a CUDA
device the machine lacks is refused with the reason (a CPU build of torch, no GPU found) instead
of failing later inside the first tensor moved there.

The project runs on CPUs of more than one kind (DESIGN.md §8): some have AVX-512 with native bf16
(bf16 autocast roughly doubles model throughput there), others only AVX2, where PyTorch *emulates*
bf16 matmuls and convolutions hundreds of times slower than fp32. Every choice of precision goes
through :func:`native_bf16`, and every figure the project prints names the machine with
:func:`machine_summary`, so that a number measured on one kind is never read as the other's.

oneDNN's ``ONEDNN_MAX_CPU_ISA=AVX2`` (with ``ATEN_CPU_CAPABILITY=avx2`` for ATen's own kernels and
``MKL_ENABLE_INSTRUCTIONS=AVX2`` for MKL's matmuls) makes an AVX-512 machine behave as an AVX2 one,
bf16 included: that is how ``make test-avx2`` tests the AVX2 path on a machine that has more.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass

import torch

from activeindex.errors import DeviceError
from activeindex.settings import parse_device


def resolve_device(device: str | torch.device | None = "auto", *, name: str = "device") -> torch.device:
    """``auto`` (or None) → ``cuda`` when :func:`torch.cuda.is_available`, else ``cpu``; ``cpu``,
    ``cuda``, ``cuda:N`` (or a :class:`torch.device` of those types) → that device, once checked
    to exist here. Raises :class:`~activeindex.errors.DeviceError` for anything else, and for a
    CUDA device this machine does not have. ``name`` is how the message calls the setting."""
    text = "auto" if device is None else str(device)
    value = parse_device(text, name=name)
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(value)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            if torch.version.cuda is None and torch.version.hip is None:
                why = f"torch {torch.__version__} is a CPU build"
            else:
                why = f"torch {torch.__version__} is built for CUDA {torch.version.cuda or torch.version.hip} but found no GPU"
            raise DeviceError(f"{name} {text}: no CUDA device is available ({why}); use {name} cpu or auto")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"{name} {text}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                              f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return dev


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """True where bf16 runs at hardware speed on ``device`` (CUDA: a GPU of compute capability 8 or more; CPU: oneDNN
    has a native bf16 ISA, AVX-512 BF16 or AMX, and is allowed to use it)."""
    device = torch.device(device)
    if device.type == "cuda":
        # Compute capability 8 (Ampere) and later; ``is_bf16_supported()`` alone also says yes
        # where bf16 is only emulated, which is what this function exists to tell apart.
        return torch.cuda.is_available() and torch.cuda.get_device_properties(device).major >= 8
    if device.type != "cpu":
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``'s "model name"), or the best the platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@dataclass(frozen=True)
class Machine:
    """The facts a measured figure depends on."""

    cpu: str  # model name
    isa: str  # the vector ISA PyTorch's own kernels use: "AVX512", "AVX2", "DEFAULT", ...
    bf16_native: bool
    threads: int  # torch intra-op threads
    torch: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        bf16 = "native bf16" if self.bf16_native else "no native bf16"
        return f"{self.cpu} ({self.isa}, {bf16}), {self.threads} torch threads, torch {self.torch}"


def machine_summary() -> Machine:
    """This machine, as :class:`Machine` (its ``str`` is the one-line form the benchmarks print)."""
    return Machine(
        cpu=cpu_model(),
        isa=torch.backends.cpu.get_cpu_capability(),
        bf16_native=native_bf16("cpu"),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )


def matmul_rate(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of an (n × n) @ (n × n) matmul in ``dtype`` on this CPU's torch threads (best of
    ``repeats`` rounds of 4): the ceiling the benchmarks quote, at the precision they actually run."""
    import time

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.matmul(a, b)  # warm-up: oneDNN / BLAS kernel selection
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best
