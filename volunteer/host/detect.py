"""What this machine can give: CPU, memory, disk, OS, battery, GPUs, and measured matmul throughput.

Every measurement goes through a :class:`Probes` object, so tests (and the dashboard's demo mode) can
describe any machine; :class:`SystemProbes` reads the real one with psutil, torch and, when the optional
``nvidia-ml-py`` package is installed (``pip install volunteer[gpu]``), NVML.

The matmul benchmark is short (about a quarter of a second per device and dtype) and is cached in the cache
directory keyed by torch version and device name, so ``volunteer info`` is fast after the first run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

logger = logging.getLogger(__name__)

BENCH_CACHE_FILE = "benchmark.json"


@dataclass(frozen=True, slots=True)
class CPUInfo:
    """The processor."""

    model: str
    """Marketing name, e.g. ``AMD Ryzen 7 5800X 8-Core Processor``; the architecture if unknown."""
    physical_cores: int
    """Physical cores (equal to ``logical_cores`` where the OS does not say)."""
    logical_cores: int
    """Logical cores (hardware threads); CPU percentages are relative to all of them."""
    max_freq_mhz: float | None
    """Maximum clock in MHz, where known."""


@dataclass(frozen=True, slots=True)
class GPUInfo:
    """One accelerator torch can use."""

    index: int
    """Device index within its backend (``cuda:<index>``)."""
    backend: str
    """``"cuda"`` (NVIDIA or ROCm) or ``"mps"`` (Apple)."""
    name: str
    """Device name."""
    memory_bytes: int | None
    """Total device memory; ``None`` for MPS, which shares system memory."""
    compute_capability: str | None
    """CUDA compute capability (``"8.6"``), where it applies."""
    nvml: NvmlReading | None = None
    """Live NVML readings, when nvidia-ml-py is installed and the driver answers."""


@dataclass(frozen=True, slots=True)
class NvmlReading:
    """What NVML says about one NVIDIA GPU right now."""

    utilization_percent: float | None
    """Busy fraction of the GPU's compute over the driver's last sample window."""
    temperature_c: float | None
    """Core temperature in degrees Celsius."""
    power_w: float | None
    """Current power draw in watts."""
    power_limit_w: float | None
    """The enforced power limit in watts."""


@dataclass(frozen=True, slots=True)
class BatteryInfo:
    """The battery, where there is one."""

    percent: float
    """Charge in percent."""
    plugged_in: bool
    """Whether mains power is connected."""


@dataclass(frozen=True, slots=True)
class BenchmarkResult:
    """Measured dense matmul throughput on one device in one dtype."""

    device: str
    """``"cpu"``, ``"cuda:0"``, ``"mps"``."""
    dtype: str
    """``"float32"``, ``"float16"`` or ``"bfloat16"``."""
    tflops: float
    """Tera floating-point operations per second (2 n^3 per n-by-n matmul)."""


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """Everything detection found, frozen; ``to_dict()`` gives the JSON of ``volunteer info --json``."""

    os_name: str
    """``Linux``, ``Darwin``, ``Windows``."""
    os_release: str
    """Kernel or OS release."""
    machine: str
    """Architecture, e.g. ``x86_64`` or ``arm64``."""
    python_version: str
    """The interpreter running the client."""
    torch_version: str | None
    """torch's version, or ``None`` if torch could not be imported."""
    cpu: CPUInfo
    """The processor."""
    memory_total_bytes: int
    """Physical RAM."""
    memory_available_bytes: int
    """RAM available to new work at detection time."""
    disk_total_bytes: int
    """Size of the file system holding the client's data."""
    disk_free_bytes: int
    """Free space on that file system."""
    battery: BatteryInfo | None
    """The battery, or ``None`` on machines without one."""
    gpus: tuple[GPUInfo, ...] = ()
    """Accelerators torch can use."""
    benchmarks: tuple[BenchmarkResult, ...] = field(default=())
    """Measured matmul throughput per device and dtype (empty if skipped)."""

    @property
    def has_battery(self) -> bool:
        """Whether the machine has a battery."""
        return self.battery is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareProfile:
        """Inverse of :meth:`to_dict` (for status snapshots received from the local client)."""
        gpus = tuple(
            GPUInfo(**{**g, "nvml": NvmlReading(**g["nvml"]) if g.get("nvml") else None}) for g in data["gpus"]
        )
        return cls(
            **{
                **data,
                "cpu": CPUInfo(**data["cpu"]),
                "battery": BatteryInfo(**data["battery"]) if data.get("battery") else None,
                "gpus": gpus,
                "benchmarks": tuple(BenchmarkResult(**b) for b in data["benchmarks"]),
            }
        )


class Probes(Protocol):
    """Where detection reads the machine from. Implement it to describe a machine in tests."""

    def os(self) -> tuple[str, str, str]:
        """``(system, release, machine)``."""
        ...

    def cpu(self) -> CPUInfo:
        """The processor."""
        ...

    def memory(self) -> tuple[int, int]:
        """``(total, available)`` bytes of RAM."""
        ...

    def disk(self, path: Path) -> tuple[int, int]:
        """``(total, free)`` bytes of the file system holding ``path``."""
        ...

    def battery(self) -> BatteryInfo | None:
        """The battery, if any."""
        ...

    def torch_version(self) -> str | None:
        """torch's version, or ``None``."""
        ...

    def gpus(self) -> list[GPUInfo]:
        """Accelerators, with NVML readings where available."""
        ...

    def benchmark(self, device: str, dtype: str) -> float:
        """Measure matmul TFLOP/s on ``device`` in ``dtype``."""
        ...


def _cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo on Linux, sysctl on macOS, platform elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


class SystemProbes:
    """Reads the real machine (psutil, torch, NVML if installed)."""

    def __init__(self, bench_seconds: float = 0.25, bench_size: int = 1024) -> None:
        """``bench_seconds`` per device and dtype; ``bench_size`` is n of the n-by-n matmul on CPU."""
        self.bench_seconds = bench_seconds
        self.bench_size = bench_size

    def os(self) -> tuple[str, str, str]:
        """``(system, release, machine)`` from :mod:`platform`."""
        return platform.system(), platform.release(), platform.machine()

    def cpu(self) -> CPUInfo:
        """Model from the OS, core counts and clock from psutil."""
        logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
        physical = psutil.cpu_count(logical=False) or logical
        try:
            freq = psutil.cpu_freq()
        except (OSError, NotImplementedError):  # some containers and VMs
            freq = None
        return CPUInfo(_cpu_model(), physical, logical, float(freq.max) if freq and freq.max else None)

    def memory(self) -> tuple[int, int]:
        """psutil's virtual memory."""
        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)

    def disk(self, path: Path) -> tuple[int, int]:
        """psutil's disk usage of the nearest existing parent of ``path``."""
        while not path.exists() and path != path.parent:
            path = path.parent
        usage = psutil.disk_usage(str(path))
        return int(usage.total), int(usage.free)

    def battery(self) -> BatteryInfo | None:
        """psutil's battery sensor, where the platform has one."""
        sensors_battery: Callable[[], Any] | None = getattr(psutil, "sensors_battery", None)
        if sensors_battery is None:
            return None
        try:
            battery = sensors_battery()
        except (OSError, NotImplementedError, RuntimeError):
            return None
        if battery is None:
            return None
        return BatteryInfo(float(battery.percent), bool(battery.power_plugged))

    def torch_version(self) -> str | None:
        """``torch.__version__``."""
        try:
            import torch
        except ImportError:
            return None
        return str(torch.__version__)

    def gpus(self) -> list[GPUInfo]:
        """CUDA devices (with NVML readings by index) and Apple MPS."""
        try:
            import torch
        except ImportError:
            return []
        found: list[GPUInfo] = []
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(index)
                found.append(
                    GPUInfo(
                        index=index,
                        backend="cuda",
                        name=str(props.name),
                        memory_bytes=int(props.total_memory),
                        compute_capability=f"{props.major}.{props.minor}",
                        nvml=nvml_reading(index),
                    )
                )
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            found.append(GPUInfo(0, "mps", "Apple GPU (MPS)", None, None))
        return found

    def benchmark(self, device: str, dtype: str) -> float:
        """Time back-to-back n-by-n matmuls for ``bench_seconds`` and return TFLOP/s."""
        import torch

        torch_dtype = getattr(torch, dtype)
        n = self.bench_size if device == "cpu" else 4096
        a = torch.randn(n, n, device=device, dtype=torch_dtype)
        b = torch.randn(n, n, device=device, dtype=torch_dtype)

        def sync() -> None:
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            elif device == "mps":
                torch.mps.synchronize()

        torch.matmul(a, b)  # warm-up: kernels, allocator
        sync()
        iterations = 0
        start = time.perf_counter()
        while True:
            torch.matmul(a, b)
            iterations += 1
            if iterations % 4 == 0:
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= self.bench_seconds:
                    break
        return 2.0 * n**3 * iterations / elapsed / 1e12


def nvml_reading(index: int) -> NvmlReading | None:
    """NVML utilization, temperature and power of CUDA device ``index``; ``None`` without nvidia-ml-py or a driver.

    NVML's index order can differ from CUDA's unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; for the caps this
    matters little on single-GPU machines, the common case for volunteers.
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        logger.debug("NVML unavailable: %s", exc)
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)

        def read(fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except pynvml.NVMLError:
                return None

        util = read(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle))
        temp = read(lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
        power = read(lambda: pynvml.nvmlDeviceGetPowerUsage(handle))
        limit = read(lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        return NvmlReading(
            utilization_percent=float(util.gpu) if util is not None else None,
            temperature_c=float(temp) if temp is not None else None,
            power_w=power / 1000.0 if power is not None else None,
            power_limit_w=limit / 1000.0 if limit is not None else None,
        )
    except pynvml.NVMLError as exc:
        logger.debug("NVML device %d unreadable: %s", index, exc)
        return None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _bench_plan(gpus: tuple[GPUInfo, ...]) -> list[tuple[str, str]]:
    plan = [("cpu", "float32")]
    for gpu in gpus:
        device = f"cuda:{gpu.index}" if gpu.backend == "cuda" else "mps"
        plan += [(device, "float32"), (device, "float16"), (device, "bfloat16")]
    return plan


def _device_key(device: str, cpu: CPUInfo, gpus: tuple[GPUInfo, ...]) -> str:
    """Cache key: the hardware's name, so a swapped GPU is measured again."""
    if device == "cpu":
        return f"cpu|{cpu.model}|{cpu.logical_cores}"
    for gpu in gpus:
        if device in (f"cuda:{gpu.index}", gpu.backend):
            return f"{device}|{gpu.name}"
    return device


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable benchmark cache %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def run_benchmarks(
    probes: Probes,
    cpu: CPUInfo,
    gpus: tuple[GPUInfo, ...],
    torch_version: str | None,
    cache_dir: Path | None,
    refresh: bool = False,
) -> tuple[BenchmarkResult, ...]:
    """Measure (or read from the cache) matmul TFLOP/s for every device and dtype.

    The cache file holds ``{"torch": version, "results": {key: {dtype: tflops}}}``; a different torch version
    discards it. A dtype the device cannot run is skipped with a debug log.
    """
    if torch_version is None:
        return ()
    cache_path = cache_dir / BENCH_CACHE_FILE if cache_dir is not None else None
    cache = _load_cache(cache_path) if cache_path is not None and not refresh else {}
    cached: dict[str, Any] = cache.get("results", {}) if cache.get("torch") == torch_version else {}
    results: list[BenchmarkResult] = []
    changed = False
    for device, dtype in _bench_plan(gpus):
        key = _device_key(device, cpu, gpus)
        value = cached.get(key, {}).get(dtype)
        if not isinstance(value, int | float) or isinstance(value, bool):
            try:
                value = probes.benchmark(device, dtype)
            except (RuntimeError, TypeError, ValueError) as exc:
                logger.debug("benchmark %s %s failed: %s", device, dtype, exc)
                continue
            cached.setdefault(key, {})[dtype] = value
            changed = True
        results.append(BenchmarkResult(device, dtype, float(value)))
    if cache_path is not None and changed:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"torch": torch_version, "results": cached}), encoding="utf-8")
            os.replace(tmp, cache_path)
        except OSError as exc:
            logger.warning("cannot write benchmark cache %s: %s", cache_path, exc)
    return tuple(results)


def detect_profile(
    probes: Probes | None = None,
    *,
    disk_path: Path | None = None,
    cache_dir: Path | None = None,
    benchmark: bool = True,
    refresh_benchmark: bool = False,
) -> HardwareProfile:
    """Detect the machine through ``probes`` (default: the real one).

    ``disk_path`` is where free space is measured (the client's data directory); ``cache_dir`` holds the
    benchmark cache (``None``: no cache). Blocking: from async code call it via ``asyncio.to_thread``.
    """
    probes = probes if probes is not None else SystemProbes()
    system, release, machine = probes.os()
    cpu = probes.cpu()
    mem_total, mem_available = probes.memory()
    disk_total, disk_free = probes.disk(disk_path or Path.home())
    torch_version = probes.torch_version()
    gpus = tuple(probes.gpus())
    benches = run_benchmarks(probes, cpu, gpus, torch_version, cache_dir, refresh_benchmark) if benchmark else ()
    return HardwareProfile(
        os_name=system,
        os_release=release,
        machine=machine,
        python_version=platform.python_version(),
        torch_version=torch_version,
        cpu=cpu,
        memory_total_bytes=mem_total,
        memory_available_bytes=mem_available,
        disk_total_bytes=disk_total,
        disk_free_bytes=disk_free,
        battery=probes.battery(),
        gpus=gpus,
        benchmarks=benches,
    )
