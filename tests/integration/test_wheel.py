"""hybrid installs like a real package: a wheel built from the checkout, installed into a
throwaway virtual environment, works from a directory outside the checkout: the dependencies it
declares are there, hybridctl doctor passes, attach compiles the BPF sources shipped inside the
package and detach removes everything, and install-service finds the unit and examples it ships.

Offline: the wheel is built without build isolation (setuptools>=77 comes with the test extra,
scripts/setup.sh installs it) and installed with --no-deps --no-index. The throwaway environment
is Debian's python3 with --system-site-packages (bcc comes from python3-bpfcc) plus a .pth file
naming the site-packages of the Python running the tests, where the dependencies are installed;
hybrid itself is found nowhere but in the throwaway environment (asserted)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = "/usr/bin/python3"
# Not copied for the build: what a clean checkout does not have.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis", "bench-results")


@dataclass
class Installed:
    src: Path           # the copy of the checkout the wheel was built from
    wheel: Path
    venv: Path
    site: Path          # the throwaway environment's site-packages
    outside: Path       # a working directory outside the checkout
    env: dict

    def run(self, argv, *, netns: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        return subprocess.run([*prefix, *argv], cwd=self.outside, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def hybridctl(self, *args, netns: str | None = None) -> subprocess.CompletedProcess:
        proc = self.run([str(self.venv / "bin" / "hybridctl"), *args], netns=netns)
        assert proc.returncode == 0, f"hybridctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
        return proc


def _clean_env(venv: Path) -> dict:
    """The caller's environment without anything that points Python or hybrid at the checkout,
    nor the session's compile cache: the installed hybridctl compiles its own copy of the BPF
    sources with bcc."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HYBRID_BPF_DIR", "VIRTUAL_ENV", "HYBRID_BPF_CACHE") and not k.startswith("PYTHON")}
    path = [p for p in env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(":")
            if p and not Path(p).resolve().is_relative_to(ROOT)]
    env["PATH"] = ":".join([str(venv / "bin"), *path])
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        pytest.fail(f"{DEBIAN_PYTHON} missing: the throwaway environment needs Debian's python3 (scripts/setup.sh)")
    if int(version("setuptools").split(".")[0]) < 77:
        pytest.fail(f"setuptools {version('setuptools')} cannot build hybrid offline (needs >= 77): "
                    "run scripts/setup.sh (the test extra installs it)")
    base = tmp_path_factory.mktemp("wheel")
    src, dist, venv, outside = base / "src", base / "dist", base / "venv", base / "outside"
    # Built from a copy: setuptools would write build/ into the checkout, and a stale build/lib
    # there would put deleted modules into the wheel.
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE, symlinks=True)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
                            "--no-build-isolation", "--no-index", "-w", str(dist), str(src)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("hybrid-*.whl")
    subprocess.run([DEBIAN_PYTHON, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=60)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (site / "hybrid-test-dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                           "--disable-pip-version-check", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    outside.mkdir()
    return Installed(src, wheel, venv, site, outside, _clean_env(venv))


def test_the_wheel_holds_every_module_and_data_file_inside_the_hybrid_package(installed):
    src = installed.src
    expected = {p.relative_to(src).as_posix() for p in (src / "hybrid").rglob("*.py")}
    expected |= {f"hybrid/cli/{p.relative_to(src / 'cli').as_posix()}" for p in (src / "cli").rglob("*.py")}
    expected |= {f"hybrid/bpf/{p.name}" for p in (src / "bpf").iterdir() if p.suffix in (".c", ".h")}
    expected |= {"hybrid/deploy/hybrid.service", "hybrid/examples/hybrid.toml"}
    expected |= {f"hybrid/examples/rules/{p.name}" for p in (src / "examples" / "rules").glob("*.toml")}
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
        info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert whl.read(info).decode().split() == ["hybrid"]
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel (add the package to pyproject.toml's packages): {missing}"
    outside = sorted(n for n in names if not n.startswith(("hybrid/", "hybrid-")))
    assert not outside, f"the wheel installs beside the hybrid package: {outside}"
    installed_top = sorted(p.name for p in installed.site.iterdir()
                           if p.name in ("cli", "bpf", "deploy", "examples", "tests"))
    assert installed_top == []


PROBE = r"""
import importlib.util, json, sys
from importlib.metadata import distribution, version
from packaging.requirements import Requirement
import hybrid, hybrid.cli.main
from hybrid.datapath import loader
unmet = []
for text in distribution("hybrid").requires or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue                        # an extra (test, bench): not needed to run
    try:
        have = version(req.name)
    except Exception as exc:
        unmet.append(f"{req}: {exc!r}")
        continue
    if not req.specifier.contains(have, prereleases=True):
        unmet.append(f"{req}: {have} installed")
imported = {}
for module in ("bcc", "click", "netfilterqueue", "pyroute2", "rich", "prometheus_client"):
    imported[module] = importlib.import_module(module).__name__
print(json.dumps({
    "hybrid": hybrid.__file__, "cli": hybrid.cli.main.__file__, "bpf_dir": str(loader.bpf_dir()),
    "top_level_cli": importlib.util.find_spec("cli") is not None,
    "top_level_bpf": importlib.util.find_spec("bpf") is not None,
    "unmet": unmet, "imported": sorted(imported), "path": sys.path,
}))
"""


def test_installed_hybrid_and_its_dependencies_import_from_outside_the_checkout(installed):
    proc = installed.run([str(installed.venv / "bin" / "python"), "-c", PROBE])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    site = str(installed.site)
    assert doc["hybrid"] == f"{site}/hybrid/__init__.py"
    assert doc["cli"] == f"{site}/hybrid/cli/main.py"
    assert doc["bpf_dir"] == f"{site}/hybrid/bpf"             # the package data, not the checkout's bpf/
    assert not doc["top_level_cli"] and not doc["top_level_bpf"]
    assert doc["unmet"] == []
    assert doc["imported"] == ["bcc", "click", "netfilterqueue", "prometheus_client", "pyroute2", "rich"]
    assert str(ROOT) not in doc["path"]                        # "" is the working directory: outside


def test_doctor_passes_with_the_installed_hybridctl(installed):
    doc = json.loads(installed.hybridctl("doctor", "--json").stdout)
    assert doc["ok"] is True
    assert [c for c in doc["checks"] if c["required"] and c["status"] != "ok"] == []


def test_attach_and_detach_with_the_installed_hybridctl(installed, fresh_lab):
    """attach compiles hybrid.bpf.c: the installed package's copy is the only one it can find
    (HYBRID_BPF_DIR unset, working directory outside the checkout)."""
    gw = fresh_lab.netns("gw")
    assert not (installed.site / "bpf").exists()              # the loader's other candidate
    installed.hybridctl("attach", "to-client", "to-server", netns=gw)
    try:
        st = json.loads(installed.hybridctl("status", "--json", netns=gw).stdout)
        assert st["attached"] is True
        assert sorted(st["interfaces"]) == ["to-client", "to-server"]
    finally:
        installed.hybridctl("detach", "--all", netns=gw)
    st = json.loads(installed.hybridctl("status", "--json", netns=gw).stdout)
    assert st["attached"] is False


def test_install_service_works_from_the_wheel(installed, tmp_path):
    out = installed.hybridctl("install-service", "--root", str(tmp_path)).stdout
    exe = installed.venv / "bin" / "hybridctl"
    unit = (tmp_path / "etc/systemd/system/hybrid.service").read_text()
    shipped = (installed.src / "deploy" / "hybrid.service").read_text()
    assert f"ExecStart={exe} " in unit
    assert unit == shipped.replace("ExecStart=/usr/local/bin/hybridctl ", f"ExecStart={exe} ")
    assert (tmp_path / "etc/hybrid/hybrid.toml").read_bytes() == (installed.src / "examples/hybrid.toml").read_bytes()
    rules = sorted(p.name for p in (installed.src / "examples" / "rules").glob("*.toml"))
    assert rules and sorted(p.name for p in (tmp_path / "etc/hybrid/rules").iterdir()) == rules
    assert f"{tmp_path}/etc/hybrid/hybrid.toml: written" in out.splitlines()
