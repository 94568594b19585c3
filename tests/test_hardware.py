import os

import pytest

from gpt.hardware import cpu_flags, cpu_mhz, cpu_peak, flops_per_cycle, native_bf16, read_cpuinfo
from gpt.logs import read_metrics

CPUINFO = """processor\t: 0
model name\t: Some CPU
cpu MHz\t\t: 2445.000
flags\t\t: fpu sse sse2 avx avx2 fma f16c
processor\t: 1
cpu MHz\t\t: 3100.500
flags\t\t: fpu sse sse2 avx avx2 fma f16c
"""


def test_flops_per_cycle_follows_the_vector_units():
    assert flops_per_cycle({"avx512f", "avx2", "fma"}) == 64
    assert flops_per_cycle({"avx2", "fma"}) == 32
    assert flops_per_cycle({"avx2"}) == 16  # no FMA: counted as SSE-class
    assert flops_per_cycle(set()) == 16


def test_native_bf16_needs_avx512_bf16_or_amx():
    assert not native_bf16(cpu_flags(CPUINFO))
    assert not native_bf16({"avx512f", "avx512bw", "avx512_vnni"})  # bf16 on AVX-512 without BF16: emulated
    assert native_bf16({"avx512f", "avx512_bf16"}) and native_bf16({"amx_tile", "amx_bf16"})


def test_peak_from_cpuinfo_text():
    assert cpu_flags(CPUINFO) >= {"avx2", "fma"} and cpu_mhz(CPUINFO) == 3100.5  # the fastest core
    peak = cpu_peak(CPUINFO, threads=1)
    assert (peak.cores, peak.flops_per_cycle, peak.mhz) == (1, 32, 3100.5)
    assert peak.flops == pytest.approx(32 * 3100.5e6)
    assert "GFLOP/s" in str(peak) and "1 cores x 32 FLOP/cycle" in str(peak)
    assert cpu_peak(CPUINFO, threads=10_000).cores == os.cpu_count()  # never more cores than the machine has
    assert cpu_peak("processor\t: 0\n", threads=2) is None  # no clock, no estimate


@pytest.mark.skipif(cpu_mhz(read_cpuinfo()) is None or native_bf16(cpu_flags(read_cpuinfo())),
                    reason="no CPU clock shown, or bf16 training (MFU is against the fp32 peak)")
def test_training_log_reports_mfu(tiny_run):
    rows = read_metrics(tiny_run / "metrics.jsonl")
    assert rows and all(0.0 < row["mfu"] < 2.0 for row in rows)  # above 1 only if the cores boost far above the clock
