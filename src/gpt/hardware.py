"""What the machine a run uses can do: the device to train on, its precision, whether to compile, and
the peak arithmetic rate of its CPU, so training logs and benchmarks can report model FLOP utilisation
(MFU): the model's FLOPs per second over what the cores could do at best.

The peak is an estimate: cores x fp32 FLOP per cycle per core (from the vector units the CPU reports)
x the clock /proc/cpuinfo shows. Cores that boost above that clock make MFU read high. There is no
estimate for GPUs, for bf16 training, or for systems without /proc/cpuinfo (MFU is then not reported).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt.config import UsageError
from gpt.distributed import World


@dataclass
class CpuPeak:
    cores: int
    flops_per_cycle: int  # fp32, per core
    mhz: float

    @property
    def flops(self) -> float:
        return self.cores * self.flops_per_cycle * self.mhz * 1e6

    def __str__(self) -> str:
        return (f"{self.flops / 1e9:.1f} GFLOP/s ({self.cores} cores x {self.flops_per_cycle} FLOP/cycle x "
                f"{self.mhz:.0f} MHz)")


def read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_flags(cpuinfo: str) -> set[str]:
    match = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def native_bf16(flags: set[str]) -> bool:
    """bf16 dot products in hardware (AVX512-BF16 or AMX): there bf16 autocast roughly doubles training speed;
    elsewhere bf16 is emulated and slower than fp32."""
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_mhz(cpuinfo: str) -> float | None:
    """The highest clock any core reports."""
    values = [float(v) for v in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.MULTILINE)]
    return max(values) if values else None


def flops_per_cycle(flags: set[str]) -> int:
    """fp32 FLOP per cycle per core: 2 FMA units x floats per vector x 2 (multiply and add)."""
    if "avx512f" in flags:
        return 2 * 16 * 2
    if "avx2" in flags and "fma" in flags:
        return 2 * 8 * 2
    return 2 * 4 * 2  # SSE, or a CPU whose flags we cannot read


def cpu_peak(cpuinfo: str | None = None, threads: int | None = None) -> CpuPeak | None:
    """The estimate for the cores torch computes on (its thread count, at most the CPU count)."""
    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    mhz = cpu_mhz(cpuinfo)
    if mhz is None:
        return None
    threads = torch.get_num_threads() if threads is None else threads
    return CpuPeak(min(threads, os.cpu_count() or threads), flops_per_cycle(cpu_flags(cpuinfo)), mhz)


def peak_flops(device: torch.device) -> CpuPeak | None:
    return cpu_peak() if device.type == "cpu" else None


def choose_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name} was asked for but no CUDA GPU is available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device mps was asked for but this PyTorch has no Apple GPU support here; use --device cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device, name: str) -> torch.dtype | None:
    """The low precision to train in, or None for plain float32. "auto" picks bf16 autocast where the
    hardware computes in bf16 natively (CUDA GPUs since Ampere, CPUs with AVX512-BF16 or AMX). The environment's
    GPT_DTYPE (float32 or bfloat16) replaces "auto": the test suite compares runs to 1e-5 and pins float32."""
    if name == "auto" and os.environ.get("GPT_DTYPE") in ("float32", "bfloat16"):
        name = os.environ["GPT_DTYPE"]
    if name == "bfloat16":
        return torch.bfloat16
    if name == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if name == "auto" and device.type == "cpu" and native_bf16(cpu_flags(read_cpuinfo())):
        return torch.bfloat16
    return None


def compiles(device: torch.device, setting: bool | None) -> bool:
    """Whether the training step goes through torch.compile. By default only on CUDA with Triton: on the CPUs
    measured it made the step slower (docs/benchmarks.md), and its first step waits for the compiler."""
    if setting is not None:
        return setting
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def compile_step(module: torch.nn.Module, device: torch.device, world: World) -> torch.nn.Module:
    """On one GPU, CUDA graphs ("reduce-overhead") replay the step's kernels without launching each from Python:
    the default preset's step ran 2.1-2.4x faster than with plain compile on an H200 (docs/benchmarks.md). Under
    torchrun the plain mode, since the graphs would hold the gradient all-reduce hooks of DDP/FSDP."""
    mode = "reduce-overhead" if device.type == "cuda" and not world.active else None
    return torch.compile(module, mode=mode)
