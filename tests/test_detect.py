"""Hardware detection with injected probes (any machine) and once against the real one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from volunteer.host.detect import (
    BENCH_CACHE_FILE,
    BatteryInfo,
    CPUInfo,
    GPUInfo,
    HardwareProfile,
    NvmlReading,
    SystemProbes,
    detect_profile,
)


@dataclass
class MachineProbes:
    """A described machine: a laptop with an NVIDIA GPU unless told otherwise."""

    torch: str | None = "2.5.0"
    gpu_list: list[GPUInfo] = field(
        default_factory=lambda: [
            GPUInfo(
                0, "cuda", "NVIDIA GeForce RTX 3060 Laptop GPU", 6 * 2**30, "8.6", NvmlReading(35.0, 61.0, 40.5, 80.0)
            )
        ]
    )
    bad_dtypes: set[str] = field(default_factory=set)
    bench_calls: list[tuple[str, str]] = field(default_factory=list)

    def os(self) -> tuple[str, str, str]:
        return "Linux", "6.8.0", "x86_64"

    def cpu(self) -> CPUInfo:
        return CPUInfo("Test CPU 9000", 8, 16, 4800.0)

    def memory(self) -> tuple[int, int]:
        return 32 * 2**30, 20 * 2**30

    def disk(self, path: Path) -> tuple[int, int]:
        return 1000 * 2**30, 400 * 2**30

    def battery(self) -> BatteryInfo | None:
        return BatteryInfo(76.0, plugged_in=False)

    def torch_version(self) -> str | None:
        return self.torch

    def gpus(self) -> list[GPUInfo]:
        return self.gpu_list

    def benchmark(self, device: str, dtype: str) -> float:
        self.bench_calls.append((device, dtype))
        if dtype in self.bad_dtypes:
            raise RuntimeError(f"{dtype} unsupported on {device}")
        return {"float32": 10.0, "float16": 40.0, "bfloat16": 38.0}[dtype] if device != "cpu" else 0.5


def test_profile_from_probes(tmp_path: Path) -> None:
    probes = MachineProbes()
    profile = detect_profile(probes, cache_dir=tmp_path)
    assert profile.cpu.logical_cores == 16
    assert profile.memory_total_bytes == 32 * 2**30
    assert profile.disk_free_bytes == 400 * 2**30
    assert profile.has_battery
    assert profile.battery == BatteryInfo(76.0, False)
    assert profile.gpus[0].nvml is not None
    assert profile.gpus[0].nvml.temperature_c == 61.0
    assert [(b.device, b.dtype, b.tflops) for b in profile.benchmarks] == [
        ("cpu", "float32", 0.5),
        ("cuda:0", "float32", 10.0),
        ("cuda:0", "float16", 40.0),
        ("cuda:0", "bfloat16", 38.0),
    ]
    data = json.loads(json.dumps(profile.to_dict()))
    assert HardwareProfile.from_dict(data) == profile


def test_benchmark_is_cached_per_torch_version(tmp_path: Path) -> None:
    probes = MachineProbes()
    first = detect_profile(probes, cache_dir=tmp_path)
    assert len(probes.bench_calls) == 4
    second = detect_profile(probes, cache_dir=tmp_path)
    assert len(probes.bench_calls) == 4  # all from the cache
    assert second.benchmarks == first.benchmarks
    probes.torch = "2.6.0"
    detect_profile(probes, cache_dir=tmp_path)
    assert len(probes.bench_calls) == 8  # a new torch is measured again
    assert json.loads((tmp_path / BENCH_CACHE_FILE).read_text())["torch"] == "2.6.0"
    detect_profile(probes, cache_dir=tmp_path, refresh_benchmark=True)
    assert len(probes.bench_calls) == 12


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path: Path) -> None:
    (tmp_path / BENCH_CACHE_FILE).write_text("{not json")
    profile = detect_profile(MachineProbes(), cache_dir=tmp_path)
    assert len(profile.benchmarks) == 4
    assert json.loads((tmp_path / BENCH_CACHE_FILE).read_text())["torch"] == "2.5.0"


def test_unsupported_dtype_is_skipped() -> None:
    profile = detect_profile(MachineProbes(bad_dtypes={"bfloat16"}), cache_dir=None)
    assert [b.dtype for b in profile.benchmarks] == ["float32", "float32", "float16"]


def test_cpu_only_machine_without_torch_or_battery() -> None:
    @dataclass
    class Desktop(MachineProbes):
        def battery(self) -> BatteryInfo | None:
            return None

    probes = Desktop(torch=None, gpu_list=[])
    profile = detect_profile(probes, cache_dir=None)
    assert profile.battery is None
    assert not profile.has_battery
    assert profile.gpus == ()
    assert profile.benchmarks == ()
    assert probes.bench_calls == []


def test_mps_machine_plan() -> None:
    probes = MachineProbes(gpu_list=[GPUInfo(0, "mps", "Apple GPU (MPS)", None, None)])
    profile = detect_profile(probes, cache_dir=None, benchmark=True)
    assert ("mps", "float16") in probes.bench_calls
    assert profile.gpus[0].memory_bytes is None


def test_real_machine(tmp_path: Path) -> None:
    probes = SystemProbes(bench_seconds=0.02, bench_size=128)
    profile = detect_profile(probes, disk_path=tmp_path / "not" / "yet", cache_dir=tmp_path)
    assert profile.cpu.logical_cores >= 1
    assert profile.cpu.physical_cores >= 1
    assert profile.memory_total_bytes >= profile.memory_available_bytes > 0
    assert profile.disk_total_bytes >= profile.disk_free_bytes > 0
    cpu_bench = [b for b in profile.benchmarks if b.device == "cpu"]
    assert len(cpu_bench) == 1
    assert cpu_bench[0].tflops > 0
    assert (tmp_path / BENCH_CACHE_FILE).exists()


@pytest.mark.gpu
def test_real_cuda_benchmark() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    profile = detect_profile(SystemProbes(bench_seconds=0.1), cache_dir=None)
    assert profile.gpus
    assert profile.gpus[0].memory_bytes
    fp16 = [b for b in profile.benchmarks if b.device == "cuda:0" and b.dtype == "float16"]
    assert fp16
    assert fp16[0].tflops > 0
