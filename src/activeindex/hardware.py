"""What the machine can do: the CPU's name, its vector ISA, and whether bf16 is native.

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


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """True where bf16 runs at hardware speed on ``device`` (CUDA: the GPU supports it; CPU: oneDNN
    has a native bf16 ISA, AVX-512 BF16 or AMX, and is allowed to use it)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
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
