"""What a provider's machine offers: GPU model, count and memory, driver, CPUs and RAM.

Detection order: NVIDIA through NVML (``pynvml``, when installed) or ``nvidia-smi``, then AMD through
``rocm-smi --json``, else CPU-only. ``--gpus MODEL:COUNT`` declares the GPUs explicitly, as ``ray start
--num-gpus`` does; tests use it to simulate GPU nodes on a CPU machine.

GPU product names are reduced to a *family* ("NVIDIA A100-SXM4-80GB" -> ``A100``) plus the nominal memory per GPU
in GB (80): a requirement ``"A100"`` matches any A100, ``"A100-80GB"`` only one with at least 80 GB. The node
advertises both as Ray custom resources (``gpu:A100`` and ``gpu:A100-80GB``, one unit per GPU) together with a
per-node resource ``cocoon-node:<id>`` that lets the controller pin a replica to a chosen node.

The parsers are pure functions over the tools' text output; the probes that run the tools take a ``run``
callable so tests feed them recorded output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from cocoon_faas.errors import InvalidRequestError

GIB = 1 << 30
NODE_RESOURCE_UNITS = 1000  # a replica pins itself with a fraction (0.001) of its node's resource

# Nominal memory per GPU (GB) for `--gpus MODEL:COUNT` declarations that name no size.
NOMINAL_GB: dict[str, int] = {
    "B200": 192, "B100": 192, "H200": 141, "H100": 80, "H800": 80, "H20": 96, "A100": 80, "A800": 80,
    "A40": 48, "A30": 24, "A10G": 24, "A10": 24, "L40S": 48, "L40": 48, "L4": 24, "T4": 16, "V100": 32,
    "RTX4090": 24, "RTX3090": 24, "MI300X": 192, "MI325X": 256, "MI250X": 128, "MI250": 128, "MI210": 64,
}

_VENDOR_WORDS = {"NVIDIA", "TESLA", "GEFORCE", "QUADRO", "AMD", "ATI", "INSTINCT", "RADEON", "PRO", "GRAPHICS"}
_FAMILY = re.compile(
    r"^(GB200|B200|B100|H200|H100|H800|H20|A100|A800|A40|A30|A10G|A10|L40S|L40|L4|T4|V100|P100"
    r"|MI\d{3}[A-Z]?|RTX\d{4}(?:TI)?|RTXA\d{4}|A\d{4})$"
)
_SIZE = re.compile(r"(\d+)\s*GB\b", re.IGNORECASE)
Runner = Callable[[list[str]], str]


@dataclass(frozen=True)
class Hardware:
    """One machine's offer. ``gpu_memory`` is per GPU; ``memory`` is host RAM; all sizes in bytes."""

    vendor: str  # "nvidia" | "amd" | "declared" | "none"
    gpu_model: str | None  # family, e.g. "H100"; None for CPU-only
    gpu_count: int
    gpu_memory: int
    driver: str | None
    cpus: int
    memory: int
    cpu_model: str = ""

    @property
    def gpu_gb(self) -> int:
        """Nominal GB per GPU (81559 MiB reads as 80)."""
        return round(self.gpu_memory / GIB) if self.gpu_memory else 0

    @property
    def label(self) -> str:
        """Human form: ``H100-80GB x2`` or ``CPU-only``."""
        if not self.gpu_model or not self.gpu_count:
            return "CPU-only"
        return f"{self.gpu_model}-{self.gpu_gb}GB x{self.gpu_count}" if self.gpu_gb else \
            f"{self.gpu_model} x{self.gpu_count}"

    def ray_resources(self, node_id: str) -> dict[str, float]:
        """Custom resources for ``ray start --resources``: GPU family, family-size and the node pin."""
        res: dict[str, float] = {f"cocoon-node:{node_id}": float(NODE_RESOURCE_UNITS)}
        if self.gpu_model and self.gpu_count:
            res[f"gpu:{self.gpu_model}"] = float(self.gpu_count)
            if self.gpu_gb:
                res[f"gpu:{self.gpu_model}-{self.gpu_gb}GB"] = float(self.gpu_count)
        return res

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> Hardware:
        """Parse the wire form, rejecting what cannot describe a machine."""
        if not isinstance(d, dict):
            raise InvalidRequestError("hardware must be a JSON object")
        try:
            hw = cls(
                vendor=str(d.get("vendor", "none")),
                gpu_model=normalize_model(str(d["gpu_model"])) if d.get("gpu_model") else None,
                gpu_count=int(d.get("gpu_count", 0)),
                gpu_memory=int(d.get("gpu_memory", 0)),
                driver=str(d["driver"]) if d.get("driver") else None,
                cpus=int(d["cpus"]),
                memory=int(d["memory"]),
                cpu_model=str(d.get("cpu_model", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequestError(f"hardware is malformed ({exc!r}); expected keys vendor, gpu_model, "
                                      "gpu_count, gpu_memory, driver, cpus, memory") from None
        if hw.gpu_count < 0 or hw.gpu_memory < 0 or hw.cpus < 0 or hw.memory < 0:
            raise InvalidRequestError("hardware counts and sizes must be >= 0")
        if hw.gpu_count and not hw.gpu_model:
            raise InvalidRequestError("hardware declares GPUs without a gpu_model")
        return hw


def normalize_model(name: str) -> str:
    """Reduce a product name to its family: "NVIDIA H100 80GB HBM3" -> "H100", "GeForce RTX 4090" -> "RTX4090"."""
    up = name.upper().replace("_", " ")
    up = re.sub(r"\bRTX\s+(A?\d{4})", r"RTX\1", up)
    up = re.sub(r"(\d{4})\s+TI\b", r"\1TI", up)
    tokens = [t for t in re.split(r"[^A-Z0-9]+", up) if t and t not in _VENDOR_WORDS]
    for tok in tokens:
        if _FAMILY.match(tok):
            return tok
    for tok in tokens:  # unknown family: first token that is not a size
        if not _SIZE.fullmatch(tok) and not tok.endswith("GB"):
            return tok
    raise InvalidRequestError(f"cannot read a GPU model from {name!r}; declare it with --gpus MODEL:COUNT")


def _size_from_name(name: str) -> int:
    m = _SIZE.search(name)
    return int(m.group(1)) if m else 0


def parse_gpus_flag(value: str) -> tuple[str, int, int]:
    """Parse ``MODEL:COUNT`` ("H100:2", "A100-80GB:1", "H100" = one) into (family, count, GB per GPU)."""
    model, _, count_s = value.strip().partition(":")
    if not model:
        raise InvalidRequestError(f"--gpus {value!r}: expected MODEL:COUNT, e.g. --gpus H100:2")
    try:
        count = int(count_s) if count_s else 1
    except ValueError:
        raise InvalidRequestError(f"--gpus {value!r}: COUNT must be an integer, e.g. --gpus H100:2") from None
    if count < 1:
        raise InvalidRequestError(f"--gpus {value!r}: COUNT must be >= 1")
    family = normalize_model(model)
    gb = _size_from_name(model) or NOMINAL_GB.get(family, 0)
    return family, count, gb


# --- probes (I/O) -------------------------------------------------------------------------------------------

def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=True).stdout


def parse_nvidia_smi(text: str) -> list[tuple[str, int, str]]:
    """Parse ``nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0]:
            continue
        mib = int(float(parts[1])) if parts[1].replace(".", "", 1).isdigit() else 0
        gpus.append((parts[0], mib << 20, parts[2]))
    return gpus


def parse_rocm_smi(text: str) -> list[tuple[str, int, str]]:
    """Parse ``rocm-smi --showproductname --showmeminfo vram --showdriverversion --json``."""
    data = json.loads(text)
    driver = ""
    for key, val in data.items():
        if not key.startswith("card") and isinstance(val, dict):
            driver = next((str(v) for k, v in val.items() if "driver version" in k.lower()), driver)
    gpus = []
    for key, card in sorted(data.items()):
        if not key.startswith("card") or not isinstance(card, dict):
            continue
        name = next((str(card[k]) for k in ("Card Series", "Card series", "Marketing Name", "Card SKU", "Card model")
                     if card.get(k) and not str(card[k]).startswith("0x")), "")
        mem = next((int(v) for k, v in card.items() if "total memory (b)" in k.lower() and "vram" in k.lower()), 0)
        drv = next((str(v) for k, v in card.items() if "driver version" in k.lower()), driver)
        if name:
            gpus.append((name, mem, drv))
    return gpus


def _nvml() -> list[tuple[str, int, str]]:
    import pynvml  # type: ignore[import-not-found]

    pynvml.nvmlInit()
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            out.append((name.decode() if isinstance(name, bytes) else name,
                        int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                        driver.decode() if isinstance(driver, bytes) else driver))
        return out
    finally:
        pynvml.nvmlShutdown()


def probe_gpus(run: Runner | None = None, which: Callable[[str], str | None] = shutil.which
               ) -> tuple[str, list[tuple[str, int, str]]]:
    """Return (vendor, [(product name, bytes, driver)]) for the first vendor tool that answers."""
    if run is None:
        try:
            gpus = _nvml()
            if gpus:
                return "nvidia", gpus
        except Exception:  # no pynvml or no driver: fall back to the CLI tools
            pass
    runner = run or _run
    if which("nvidia-smi"):
        try:
            gpus = parse_nvidia_smi(runner(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                            "--format=csv,noheader,nounits"]))
            if gpus:
                return "nvidia", gpus
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    if which("rocm-smi"):
        try:
            gpus = parse_rocm_smi(runner(["rocm-smi", "--showproductname", "--showmeminfo", "vram",
                                          "--showdriverversion", "--json"]))
            if gpus:
                return "amd", gpus
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return "none", []


def host_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def from_probe(vendor: str, gpus: list[tuple[str, int, str]], cpus: int, memory: int, cpu: str = "") -> Hardware:
    """Build the offer from probed GPUs: the most common model among them (mixed boxes offer that one)."""
    if not gpus:
        return Hardware("none", None, 0, 0, None, cpus, memory, cpu)
    families = [normalize_model(name) for name, _, _ in gpus]
    family = max(sorted(set(families)), key=families.count)
    same = [g for g, f in zip(gpus, families, strict=True) if f == family]
    name, mem, driver = same[0]
    mem = min(m for _, m, _ in same) or (_size_from_name(name) * GIB)
    return Hardware(vendor, family, len(same), mem, driver or None, cpus, memory, cpu)


def detect(gpus_flag: str | None = None, *, cpus: int | None = None, memory: int | None = None,
           run: Runner | None = None, which: Callable[[str], str | None] = shutil.which) -> Hardware:
    """Detect this machine's offer; ``gpus_flag`` ("H100:2") overrides GPU detection."""
    n_cpus = cpus if cpus is not None else host_cpus()
    mem = memory if memory is not None else host_memory()
    if gpus_flag:
        family, count, gb = parse_gpus_flag(gpus_flag)
        return Hardware("declared", family, count, gb * GIB, None, n_cpus, mem, cpu_model())
    vendor, gpus = probe_gpus(run, which)
    return from_probe(vendor, gpus, n_cpus, mem, cpu_model())


def with_cpus(hw: Hardware, cpus: int) -> Hardware:
    """The same offer with fewer CPUs advertised (a provider keeping cores for itself)."""
    return replace(hw, cpus=cpus)
