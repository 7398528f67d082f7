"""`make wheelhouse` (tools/wheelhouse.py): which of the GPU lock's wheels it takes for a machine that already has
part of the set, and the slimmed wheels it writes; pip downloads from a local folder, not from PyPI."""

import os
import subprocess
import sys
import zipfile

from tests.conftest import ROOT
from tools.wheelhouse import select

GPU_LOCK = ROOT / "requirements" / "gpu.txt"


def names(requirements) -> set[str]:
    return {requirement.name for requirement in requirements}


def test_an_excluded_package_goes_with_what_only_it_requires():
    kept, left = select(GPU_LOCK, "3.12", ["torch", "transformers", "wandb"])
    assert {"torch", "transformers", "wandb"} <= set(left)
    # torch's CUDA 13 libraries and sympy serve torch alone; cwevals serves wandb alone
    assert not names(kept) & {"nvidia-cublas", "nvidia-cudnn-cu13", "cuda-toolkit", "sympy", "cwevals"}
    # datasets needs huggingface-hub too; the project itself declares pydantic; xformers needs CUDA 12's runtime
    assert {"huggingface-hub", "pydantic", "unsloth", "xformers", "nvidia-cuda-runtime-cu12"} <= names(kept)


def test_nothing_excluded_is_the_whole_linux_set_for_that_python():
    kept, left = select(GPU_LOCK, "3.12", [])
    assert {"torch", "triton", "nvidia-cublas", "nvidia-cudnn-cu13", "cuda-toolkit"} <= names(kept)
    assert not names(kept) & {"mlx", "triton-windows", "colorama"}, "macOS and Windows pins are left out"
    assert [str(r.specifier) for r in kept if r.name == "numpy"] == ["==2.5.5"]
    assert [str(r.specifier) for r in select(GPU_LOCK, "3.11", [])[0] if r.name == "numpy"] == ["==2.4.6"]


def wheel(folder, name: str, version: str, files: list[str]) -> None:
    dist = f"{name}-{version}.dist-info"
    members = {path: f"# {path}\n" for path in files}
    members[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    members[f"{dist}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    members[f"{dist}/RECORD"] = "".join(f"{path},," + "\n" for path in [*members, f"{dist}/RECORD"])
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as archive:
        for path, text in members.items():
            archive.writestr(path, text)


LOCK = """\
botocore==1.44.8
    # via finetune-job (pyproject.toml)
mlx==0.32.4 ; sys_platform == 'darwin'
    # via unsloth
nvidia-cublas==13.1.0.3 ; sys_platform == 'linux'
    # via torch
torch==2.11.0
    # via
    #   finetune-job (pyproject.toml)
    #   unsloth
trl==1.14.2
    # via finetune-job (pyproject.toml)
unsloth==2026.10.9
    # via finetune-job (pyproject.toml)
"""


def test_the_wheelhouse_holds_the_slimmed_wheels_of_what_the_target_lacks(tmp_path):
    source, out = tmp_path / "index", tmp_path / "wheels"
    source.mkdir(), out.mkdir()
    wheel(source, "unsloth", "2026.10.9", ["unsloth/__init__.py", "studio/backend/app.py"])
    wheel(
        source,
        "botocore",
        "1.44.8",
        ["botocore/data/s3/service-2.json", "botocore/data/ec2/service-2.json", "botocore/data/endpoints.json"],
    )
    wheel(source, "trl", "1.14.2", ["trl/__init__.py"])
    (tmp_path / "gpu.txt").write_text(LOCK)
    (out / "old-0.1-py3-none-any.whl").write_text("from the last build")
    # torch, its CUDA library and macOS's mlx are in no index here: pip would fail if it were asked for them
    env = os.environ | {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(source)}
    command = [sys.executable, str(ROOT / "tools" / "wheelhouse.py"), "--lock", str(tmp_path / "gpu.txt")]
    done = subprocess.run(
        [*command, "--out", str(out), "--exclude", "torch", "pytest"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "so not excluded: pytest" in done.stdout and "3 wheels" in done.stdout
    built = {path.name.split("-")[0]: zipfile.ZipFile(path) for path in out.iterdir()}
    assert built.keys() == {"botocore", "trl", "unsloth"}
    assert "studio/backend/app.py" not in built["unsloth"].namelist()
    kept = {"botocore/data/s3/service-2.json", "botocore/data/endpoints.json"}
    assert {n for n in built["botocore"].namelist() if n.startswith("botocore/data/")} == kept
    record = built["botocore"].read("botocore-1.44.8.dist-info/RECORD").decode()
    assert "botocore/data/ec2" not in record and "botocore/data/s3/service-2.json" in record
    # what pip installs from it
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)]
        + [str(path) for path in out.iterdir()],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    assert (site / "unsloth" / "__init__.py").exists() and not (site / "studio").exists()


def test_make_wheelhouse_runs_the_tool():
    shown = subprocess.run(
        ["make", "-n", "wheelhouse", "WHEELHOUSE_EXCLUDE=torch\ntriton"],  # as $(cut -d= -f1 have.txt) gives it
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "tools/wheelhouse.py" in shown and "--exclude torch triton" in shown
