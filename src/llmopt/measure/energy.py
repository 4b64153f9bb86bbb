"""Energy of a block of work: measured by NVML or RAPL when readable, otherwise estimated and said so.

    with EnergyMeter() as meter:
        train_steps()
    meter.joules, meter.method, meter.measured, meter.to_dict()

Backends, in the order `backend="auto"` tries them:

`nvml`
    `nvmlDeviceGetTotalEnergyConsumption` (millijoules since the driver loaded; Volta and newer) of the
    GPU `device_index` (NVML numbering, which ignores `CUDA_VISIBLE_DEVICES`), via `pynvml` (package
    `nvidia-ml-py`). Whole-GPU energy: other processes on the same GPU are included.
`rapl`
    Linux powercap counters, `<root>/intel-rapl:*/energy_uj` (AMD CPUs use the same names).
    `joules` is the sum of the package zones (`name` = `package-N`): core and uncore sub-zones are inside
    their package and `psys` contains it, so adding them would double count; every readable zone is
    still listed in `zones`. DRAM is a separate domain, listed in `zones` but not added. A counter wraps
    at `max_energy_range_uj`; one wrap between two readings is undone, so call `sample()` at least
    once per wrap period (minutes at full load) in long runs. Since 2020 (CVE-2020-8694) `energy_uj` is
    readable by root only on most kernels; unreadable zones are skipped and the reason kept. Whole-socket
    energy: other processes are included.
`estimate`
    Not a measurement: `joules = CPU seconds of this process x watts_per_core`. CPU seconds come from
    `time.process_time()` (all threads of this process, user + system), so the estimate scales with
    the process's utilization: one busy core for one second costs `watts_per_core` joules, idle time
    costs nothing. Default `ESTIMATE_WATTS_PER_CORE = 10.0` W, an assumption of the order of a server
    CPU's TDP divided by its cores (AMD EPYC 7763: 280 W / 64 cores = 4.4 W; Intel Xeon Platinum 8380:
    270 W / 40 cores = 6.75 W; desktop parts run higher per core), the same TDP-per-core model as
    Green Algorithms (Lannelongue et al., Advanced Science 2021). It ignores memory, GPU, idle and
    platform power, so it is for comparing candidates in the same run only. Every output carries
    `"energy_method": "estimated"` and `"energy_measured": False`.
"""

from __future__ import annotations

import glob
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

ESTIMATE_WATTS_PER_CORE = 10.0
"""Watts per fully busy core for the `estimate` backend (see the module docstring for the source)."""

METHODS = ("nvml", "rapl", "estimated")


# ---- RAPL --------------------------------------------------------------------------------

@dataclass
class RaplZone:
    """One powercap zone: its directory, name, counter range and last reading."""

    path: str
    name: str
    max_range_uj: int
    last_uj: int
    joules: float = 0.0

    @property
    def is_package(self) -> bool:
        return self.name.startswith("package")


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


class RaplReader:
    """Reads every `intel-rapl:*` zone under `root` (default /sys/class/powercap), nested ones included."""

    def __init__(self, root: str = "/sys/class/powercap") -> None:
        self.root = root
        self.zones: list[RaplZone] = []
        self.skipped: dict[str, str] = {}
        """Zone directory -> why it could not be read."""
        self.zones = self._open()

    def _zone_dirs(self) -> list[str]:
        found = glob.glob(os.path.join(self.root, "intel-rapl:*")) + \
            glob.glob(os.path.join(self.root, "intel-rapl:*", "intel-rapl:*"))
        by_id: dict[str, str] = {}  # sub-zones appear nested and as top-level links: keep one per id
        for d in sorted(found):
            by_id.setdefault(os.path.basename(d), d)
        return [by_id[k] for k in sorted(by_id)]

    def _open(self) -> list[RaplZone]:
        zones = []
        for d in self._zone_dirs():
            try:
                with open(os.path.join(d, "name")) as f:
                    name = f.read().strip()
                max_range = _read_int(os.path.join(d, "max_energy_range_uj"))
                now = _read_int(os.path.join(d, "energy_uj"))
            except (OSError, ValueError) as e:
                self.skipped[d] = f"{type(e).__name__}: {e}"
                continue
            zones.append(RaplZone(path=d, name=name, max_range_uj=max_range, last_uj=now))
        return zones

    @property
    def available(self) -> bool:
        return bool(self.zones)

    def sample(self) -> None:
        """Read every zone and add the energy since the previous reading (undoing one wraparound)."""
        for zone in self.zones:
            try:
                now = _read_int(os.path.join(zone.path, "energy_uj"))
            except (OSError, ValueError) as e:
                self.skipped[zone.path] = f"{type(e).__name__}: {e}"
                continue
            delta = now - zone.last_uj
            if delta < 0:  # the counter wrapped at max_energy_range_uj
                delta += zone.max_range_uj
            zone.joules += delta / 1e6
            zone.last_uj = now

    def joules(self) -> float:
        """Energy of the package zones so far; the top-level zones except psys if no zone is named package."""
        packages = [z for z in self.zones if z.is_package]
        if not packages:
            packages = [z for z in self.zones if os.path.basename(z.path).count(":") == 1 and z.name != "psys"]
        return sum(z.joules for z in packages)


# ---- NVML --------------------------------------------------------------------------------

class NvmlReader:
    """Total energy counter of one GPU through pynvml; raises RuntimeError when unusable."""

    def __init__(self, device_index: int = 0) -> None:
        try:
            import pynvml
        except ImportError as e:
            raise RuntimeError("pynvml is not installed (pip install nvidia-ml-py)") from e
        try:
            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() <= device_index:
                raise RuntimeError(f"NVML sees no GPU with index {device_index}")
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except pynvml.NVMLError as e:
            raise RuntimeError(f"NVML energy counter unavailable: {e}") from e
        self._pynvml = pynvml
        self.device_name = str(pynvml.nvmlDeviceGetName(self._handle))

    def joules(self) -> float:
        return (self._pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._start_mj) / 1e3


# ---- the meter ---------------------------------------------------------------------------

@dataclass
class EnergyMeter:
    """Context manager measuring the energy of its block; see the module docstring for the backends.

    `backend="auto"` uses the first that works (nvml, rapl, estimate); naming one that cannot be read
    raises `RuntimeError` with the reason. After the block: `joules`, `seconds`, `method` (one of
    "nvml", "rapl", "estimated"), `measured`, `note` and `to_dict()`.
    """

    backend: str = "auto"
    """"auto", "nvml", "rapl" or "estimate"."""
    rapl_root: str = "/sys/class/powercap"
    """Where the powercap zones live (tests point it at a fake tree)."""
    device_index: int = 0
    """GPU index for NVML."""
    watts_per_core: float = ESTIMATE_WATTS_PER_CORE
    """Power of one busy core for the estimate."""
    joules: float = field(default=math.nan, init=False)
    seconds: float = field(default=math.nan, init=False)
    method: str = field(default="", init=False)
    cpu_seconds: float = field(default=math.nan, init=False)
    """CPU time of this process (all threads) inside the block."""
    note: str = field(default="", init=False)
    """Why the method was chosen (what was unavailable), or what the estimate leaves out."""

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "nvml", "rapl", "estimate"):
            raise ValueError(f"energy backend must be auto, nvml, rapl or estimate, got {self.backend!r}")
        self._rapl: RaplReader | None = None
        self._nvml: NvmlReader | None = None

    @property
    def measured(self) -> bool:
        return self.method in ("nvml", "rapl")

    def _choose(self) -> None:
        reasons = []
        if self.backend in ("auto", "nvml"):
            try:
                import torch

                if self.backend == "auto" and not torch.cuda.is_available():
                    raise RuntimeError("no CUDA device")
                self._nvml = NvmlReader(self.device_index)
                self.method = "nvml"
                return
            except RuntimeError as e:
                if self.backend == "nvml":
                    raise
                reasons.append(f"nvml: {e}")
        if self.backend in ("auto", "rapl"):
            rapl = RaplReader(self.rapl_root)
            if rapl.available:
                self._rapl, self.method = rapl, "rapl"
                return
            why = ("; ".join(f"{os.path.basename(k)}: {v}" for k, v in rapl.skipped.items())
                   or f"no intel-rapl zones under {self.rapl_root}")
            if self.backend == "rapl":
                raise RuntimeError(f"RAPL energy unreadable: {why} (energy_uj is usually root-only)")
            reasons.append(f"rapl: {why}")
        self.method = "estimated"
        self.note = (f"estimated: CPU seconds of this process x {self.watts_per_core:g} W per core; "
                     "GPU, memory and idle power not included" + (f" ({'; '.join(reasons)})" if reasons else ""))

    def __enter__(self) -> "EnergyMeter":
        self.joules, self.method, self.note = math.nan, "", ""
        self._choose()
        self._cpu_start = time.process_time()
        self._wall_start = time.perf_counter()
        return self

    def sample(self) -> None:
        """Read the RAPL counters now (call periodically in long runs so no wraparound is missed)."""
        if self._rapl is not None:
            self._rapl.sample()

    def __exit__(self, *exc) -> None:
        if self.method == "nvml":
            import torch

            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._wall_start
        self.cpu_seconds = time.process_time() - self._cpu_start
        if self.method == "nvml":
            self.joules = self._nvml.joules()
        elif self.method == "rapl":
            self._rapl.sample()
            self.joules = self._rapl.joules()
            self.note = "package zones: " + ", ".join(z.name for z in self._rapl.zones if z.is_package)
        else:
            self.joules = self.cpu_seconds * self.watts_per_core

    @property
    def zones(self) -> dict[str, float]:
        """Joules per RAPL zone (all readable zones, sub-zones included); empty for other methods."""
        if self._rapl is None:
            return {}
        return {os.path.basename(z.path) + f" ({z.name})": z.joules for z in self._rapl.zones}

    def to_dict(self) -> dict[str, Any]:
        """{"energy_j", "energy_seconds", "energy_method", "energy_measured", "energy_note"}."""
        return {"energy_j": self.joules, "energy_seconds": self.seconds, "energy_method": self.method,
                "energy_measured": self.measured, "energy_note": self.note}


def joules_per_step(joules: float, steps: int) -> float:
    return joules / steps if steps > 0 else math.nan


def tokens_per_joule(tokens: float, joules: float) -> float:
    return tokens / joules if joules > 0 else math.nan


def flops_per_joule(flops: float, joules: float) -> float:
    return flops / joules if joules > 0 else math.nan
