"""requirements/*.txt pin every package of each set (`make lock`); these checks fail when a declared
dependency and its lock disagree."""

import re
import subprocess
import tomllib

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(name: str) -> dict[str, set[str]]:
    """{package: version} of a lock file; a package pinned twice (per platform) keeps every version."""
    found: dict[str, set[str]] = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\[\]-]+)==([^ ;]+)", line)
        if match:
            package = re.sub(r"\[.*\]", "", match[1]).lower().replace("_", "-")
            found.setdefault(package, set()).add(match[2])
    return found


LOCKS = {
    "cpu.txt": PROJECT["dependencies"],
    "dev.txt": PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"],
    "gpu.txt": PROJECT["dependencies"] + PROJECT["optional-dependencies"]["gpu"],
}


@pytest.mark.parametrize("lock", list(LOCKS))
def test_every_declared_dependency_is_pinned_within_its_range(lock):
    locked = pins(lock)
    for text in LOCKS[lock]:
        requirement = Requirement(text)
        name = requirement.name.lower().replace("_", "-")
        assert name in locked, f"{name} is declared but not in requirements/{lock}: run make lock"
        for version in locked[name]:
            assert requirement.specifier.contains(version, prereleases=True), (
                f"requirements/{lock} pins {name}=={version}, outside {requirement}: run make lock"
            )


def test_the_dev_set_is_the_cpu_set_plus_tools():
    cpu, dev = pins("cpu.txt"), pins("dev.txt")
    assert {name: dev.get(name) for name in cpu} == cpu, "dev.txt must pin the CPU set as cpu.txt does"


def test_gpu_set_is_unsloths_range():
    gpu = pins("gpu.txt")
    assert gpu["unsloth"] == {"2026.10.9"} and gpu["trl"] == {"1.14.2"} and gpu["transformers"] == {"5.17.0"}
    assert gpu["torch"] == {"2.11.0"} and gpu["triton"] == {"3.6.0"} and gpu["xformers"] == {"0.0.35"}
    # PyPI's xformers 0.0.35 is a CUDA 12.8 build: beside CUDA 13's torch it needs CUDA 12's runtime library.
    assert gpu["nvidia-cuda-runtime-cu12"] == {"12.8.90"} and "nvidia-cudnn-cu13" in gpu and "bitsandbytes" in gpu


def test_gpu_set_is_the_stack_the_benchmarks_measured():
    """The GPU lock pins what the newest docs/benchmarks.md heading that names a package measured (the heading's
    torch 2.11.0+cu130 is what PyPI's torch 2.11.0 reports as its version: its CUDA 13.0 build)."""
    gpu = pins("gpu.txt")
    headings = re.findall(r"^## (.*)$", (ROOT / "docs" / "benchmarks.md").read_text(), flags=re.M)
    stack = r"\b(torch|triton|xformers|unsloth|trl|transformers|bitsandbytes) (\d[\w.]*)"
    measured = {}
    for heading in reversed(headings):  # newest first in the file: the newest wins
        measured |= dict(re.findall(stack, heading))
    assert {"torch", "triton", "unsloth"} <= measured.keys(), f"docs/benchmarks.md headings name no stack: {headings}"
    for name, version in measured.items():
        assert gpu[name] == {version}, f"requirements/gpu.txt pins {name} {gpu[name]}, the benchmarks ran {version}"


def test_make_help_lists_every_target():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z0-9][a-z0-9-]*):", makefile, flags=re.M))
    documented = set(re.findall(r"^\.PHONY: ([a-z0-9-]+) +## ", makefile, flags=re.M))
    assert targets == documented, f"targets without a ## line: {sorted(targets - documented)}"
    shown = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert set(re.findall(r"make ([a-z0-9-]+)", shown)) == targets
