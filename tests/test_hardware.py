"""Hardware detection: vendor tool output parsing, model naming, `--gpus` declarations, Ray resources."""

from __future__ import annotations

import json

import pytest

from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.runtime import hardware
from cocoon_faas.runtime.hardware import GIB, Hardware

# The shape nvidia-smi prints for --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits
NVIDIA_SMI = """NVIDIA H100 80GB HBM3, 81559, 550.54.15
NVIDIA H100 80GB HBM3, 81559, 550.54.15
"""
NVIDIA_SMI_A100 = "NVIDIA A100-SXM4-40GB, 40960, 535.104.05\n"
# The shape rocm-smi prints for --showproductname --showmeminfo vram --showdriverversion --json
ROCM_SMI = json.dumps({
    "card0": {"Card Series": "AMD Instinct MI300X", "Card Model": "0x74a1", "Card Vendor": "Advanced Micro Devices",
              "VRAM Total Memory (B)": "206141652992", "VRAM Total Used Memory (B)": "285212672"},
    "card1": {"Card Series": "AMD Instinct MI300X", "Card Model": "0x74a1", "Card Vendor": "Advanced Micro Devices",
              "VRAM Total Memory (B)": "206141652992", "VRAM Total Used Memory (B)": "285212672"},
    "system": {"Driver version": "6.7.0"},
})


def fake(tools: dict[str, str]):
    def which(name: str) -> str | None:
        return f"/usr/bin/{name}" if name in tools else None

    def run(cmd: list[str]) -> str:
        return tools[cmd[0]]

    return run, which


@pytest.mark.parametrize(("name", "family"), [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA GeForce RTX 4090", "RTX4090"),
    ("AMD Instinct MI300X", "MI300X"), ("Tesla T4", "T4"), ("NVIDIA L40S", "L40S"), ("NVIDIA H100 NVL", "H100"),
    ("NVIDIA RTX A6000", "RTXA6000"), ("h100", "H100"), ("A100-80GB", "A100"),
])
def test_normalize_model(name: str, family: str) -> None:
    assert hardware.normalize_model(name) == family


def test_nvidia_smi_detection() -> None:
    run, which = fake({"nvidia-smi": NVIDIA_SMI})
    hw = hardware.detect(cpus=32, memory=512 * GIB, run=run, which=which)
    assert (hw.vendor, hw.gpu_model, hw.gpu_count, hw.gpu_gb, hw.driver) == ("nvidia", "H100", 2, 80, "550.54.15")
    assert hw.label == "H100-80GB x2" and hw.cpus == 32


def test_nvidia_size_variant_from_memory() -> None:
    run, which = fake({"nvidia-smi": NVIDIA_SMI_A100})
    hw = hardware.detect(cpus=8, memory=GIB, run=run, which=which)
    assert hw.gpu_model == "A100" and hw.gpu_gb == 40
    assert hw.ray_resources("n1") == {"cocoon-node:n1": 1000.0, "gpu:A100": 1.0, "gpu:A100-40GB": 1.0}


def test_rocm_smi_detection() -> None:
    run, which = fake({"rocm-smi": ROCM_SMI})
    hw = hardware.detect(cpus=8, memory=GIB, run=run, which=which)
    assert (hw.vendor, hw.gpu_model, hw.gpu_count, hw.gpu_gb, hw.driver) == ("amd", "MI300X", 2, 192, "6.7.0")


def test_cpu_only_when_no_tool_answers() -> None:
    run, which = fake({})
    hw = hardware.detect(cpus=4, memory=8 * GIB, run=run, which=which)
    assert hw.gpu_model is None and hw.gpu_count == 0 and hw.label == "CPU-only"
    assert hw.ray_resources("x") == {"cocoon-node:x": 1000.0}


def test_broken_tool_output_falls_back() -> None:
    run, which = fake({"nvidia-smi": "", "rocm-smi": ROCM_SMI})
    assert hardware.detect(cpus=1, memory=GIB, run=run, which=which).vendor == "amd"


def test_gpus_flag_overrides_detection() -> None:
    run, which = fake({"nvidia-smi": NVIDIA_SMI})
    hw = hardware.detect("A100-80GB:2", cpus=4, memory=GIB, run=run, which=which)
    assert (hw.vendor, hw.gpu_model, hw.gpu_count, hw.gpu_gb) == ("declared", "A100", 2, 80)
    assert hardware.detect("H100", cpus=1, memory=GIB).gpu_count == 1
    assert hardware.detect("H200:8", cpus=1, memory=GIB).gpu_gb == 141


@pytest.mark.parametrize("bad", ["H100:x", "H100:0", ":2"])
def test_gpus_flag_errors_say_the_form(bad: str) -> None:
    with pytest.raises(InvalidRequestError, match="MODEL:COUNT|COUNT"):
        hardware.parse_gpus_flag(bad)


def test_real_host_probe_is_consistent() -> None:
    hw = hardware.detect()
    assert hw.cpus >= 1 and hw.memory > 0
    assert (hw.gpu_count == 0) == (hw.gpu_model is None)


def test_wire_round_trip_and_validation() -> None:
    hw = Hardware("nvidia", "H100", 2, 80 * GIB, "550", 32, 256 * GIB, "EPYC")
    assert Hardware.from_dict(json.loads(json.dumps(hw.to_dict()))) == hw
    with pytest.raises(InvalidRequestError, match="malformed"):
        Hardware.from_dict({"gpu_model": "H100"})
    with pytest.raises(InvalidRequestError, match=">= 0"):
        Hardware.from_dict({**hw.to_dict(), "gpu_count": -1})
    with pytest.raises(InvalidRequestError, match="without a gpu_model"):
        Hardware.from_dict({**hw.to_dict(), "gpu_model": None})
