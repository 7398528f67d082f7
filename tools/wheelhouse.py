"""Download the wheels of the GPU lock for a machine without a package index, less what it already has.
`make wheelhouse` runs it:

    python tools/wheelhouse.py [--out .gpu-wheels] [--python-version 3.12] [--exclude torch transformers ...]

--exclude names packages the target already has, or will not use: they are left out, and so is what the lock
pins only for them (torch takes its CUDA libraries with it). Three wheels lose what training never uses: unsloth
its web studio, bitsandbytes its CUDA 11/12 and ROCm builds (the lock's torch is CUDA 13), botocore every service
model but S3's and the credential services'. Then, on the target (README: Air-gapped clusters):

    pip install --no-index --find-links .gpu-wheels -r requirements/gpu.txt    # nothing excluded
    pip install --no-index --no-deps .gpu-wheels/*.whl                         # beside what it has
"""

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Wheels for glibc 2.17 to 2.35 (Ubuntu 22.04 has 2.35, 24.04 2.39, Debian 12 2.36): pip matches only the tags given.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 36)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
# Members left out of a wheel, by the regex their path matches (sizes of the wheels of requirements/gpu.txt).
SLIM = {
    "unsloth": r"^studio/",  # the web studio: 28.6 MB -> 2.2 MB
    "bitsandbytes": r"libbitsandbytes_(cuda1[12]|rocm)",  # CUDA 13 and CPU builds kept: 43 MB -> 7.4 MB
    "botocore": r"^botocore/data/(?!(s3|sts|sso|sso-oidc|s3control)/|[^/]+\.json$)",  # 16.9 MB -> 0.9 MB
}


def read_lock(text: str) -> tuple[dict, dict[str, set[str]]]:
    """uv's lock: {name: [Requirement]} of its pins (one per platform or Python where they differ), and
    {name: the names it requires} from its `# via` comments, the project itself under ""."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins, needs, current = {}, {}, None
    for line in text.splitlines():
        via = re.match(r"^ +# (?:via(?: |$))? *(\S.*)?$", line)
        if line and not line[0].isspace() and not line.startswith("#"):
            requirement = Requirement(line)
            current = canonicalize_name(requirement.name)
            pins.setdefault(current, []).append(requirement)
        elif current and via and via[1]:
            needer = "" if via[1].endswith("(pyproject.toml)") else canonicalize_name(via[1])
            needs.setdefault(needer, set()).add(current)
    return pins, needs


def select(lock: Path, python_version: str, exclude: list[str]) -> tuple[list, list[str]]:
    """The lock's pins that the project needs on Linux x86_64 with this Python, less the excluded packages and what
    only they require; and the names of the lock's packages left out."""
    from packaging.utils import canonicalize_name

    pins, needs = read_lock(lock.read_text())
    excluded = {canonicalize_name(name) for name in exclude}
    target = {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    applies = {
        name: [r for r in requirements if r.marker is None or r.marker.evaluate(target)]
        for name, requirements in pins.items()
    }
    wanted, queue = set(), [""]
    while queue:
        for name in needs.get(queue.pop(), ()):
            if name not in wanted and name not in excluded and applies[name]:
                wanted.add(name)
                queue.append(name)
    kept = [requirement for name in sorted(wanted) for requirement in applies[name]]
    return kept, sorted(name for name in pins.keys() - wanted if applies[name])


def slim(wheel: Path, out: Path, pattern: str) -> Path:
    """A copy of the wheel in out without the members whose paths match pattern, its RECORD to match."""
    drop = re.compile(pattern).search
    target = out / wheel.name
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as copy:
        for member in source.infolist():
            if drop(member.filename):
                continue
            data = source.read(member)
            if member.filename.endswith(".dist-info/RECORD"):
                rows = [row for row in data.decode().splitlines() if not drop(row.split(",")[0])]
                data = ("\n".join(rows) + "\n").encode()
            copy.writestr(member, data)
    return target


def download(requirements: list, python_version: str, folder: Path) -> None:
    """pip download of exactly these pins, as wheels built for the target Python and Linux."""
    listed = folder / "requirements.txt"
    listed.write_text("".join(f"{r.name}{r.specifier}\n" for r in requirements))
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp"]
    command += ["--python-version", python_version, *platforms, "--dest", str(folder), "-r", str(listed)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"pip download failed ({done.returncode}):\n{done.stderr[-3000:]}")


def build(out: Path, python_version: str, exclude: list[str], lock: Path) -> None:
    from packaging.utils import canonicalize_name, parse_wheel_filename

    kept, left = select(lock, python_version, exclude)
    unknown = [name for name in exclude if canonicalize_name(name) not in left]
    if unknown:
        print(f"not in {lock.name} for this target, so not excluded: {' '.join(unknown)}")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as raw:
        download(kept, python_version, Path(raw))
        for wheel in sorted(Path(raw).glob("*.whl")):
            name = parse_wheel_filename(wheel.name)[0]
            if name in SLIM:
                target = slim(wheel, out, SLIM[name])
                print(f"{wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB -> {target.stat().st_size / 1e6:.1f} MB")
            else:
                (out / wheel.name).write_bytes(wheel.read_bytes())
    wheels = sorted(out.glob("*.whl"))
    size = sum(wheel.stat().st_size for wheel in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {out}; left out: {len(left)} of the lock's packages")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-wheels", help="the wheel folder (its wheels replaced)")
    parser.add_argument("--python-version", default="3.12", help="the target's Python, major.minor")
    parser.add_argument("--exclude", nargs="*", default=[], help="packages the target has or will not use")
    parser.add_argument("--lock", type=Path, default=ROOT / "requirements" / "gpu.txt", help="a lock made by uv")
    args = parser.parse_args()
    build(args.out, args.python_version, args.exclude, args.lock)


if __name__ == "__main__":
    main()
