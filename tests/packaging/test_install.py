"""The source folders backends/ and cache/ install as cloudfs.backends and cloudfs.cache, never
as generic top-level packages: checked for the editable install of this checkout and for a
wheel built from it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable  # the project venv's interpreter (the one running pytest)
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "cloudfs", "backends", "cache"]
MODULES = ["cloudfs.layout", "cloudfs.backends", "cloudfs.backends.base", "cloudfs.cache",
           "cloudfs.cache.block_cache"]

# Run in a child interpreter: import the cloudfs modules, then try the generic names.
PROBE = f"""
import importlib, json, sys
out = {{"files": {{}}, "generic": {{}}}}
for name in {MODULES!r}:
    mod = importlib.import_module(name)
    out["files"][name] = getattr(mod, "__file__", None)
out["cache_path"] = [str(p) for p in sys.modules["cloudfs.cache"].__path__]
for name in ("backends", "cache"):
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError:
        out["generic"][name] = None
    else:
        out["generic"][name] = str(getattr(mod, "__file__", None) or list(mod.__path__))
print(json.dumps(out))
"""


def _probe(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([PY, *args, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _under(path: str | None, root: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(root.resolve())


def _generic_entries(site: Path) -> list[str]:
    """Anything in a site-packages directory that would import as `backends` or `cache`."""
    return sorted(p.name for p in site.iterdir()
                  if p.name in ("backends", "cache") or p.name.split(".")[0] in ("backends", "cache"))


# --------------------------------------------------------------------------- editable install

def _installed_dist() -> metadata.Distribution | None:
    """cloudfs as installed in this venv (not the checkout's own cloudfs.egg-info, which is
    on sys.path too when pytest runs from the repo)."""
    site = sysconfig.get_paths()["purelib"]
    dists = list(metadata.distributions(name="cloudfs", path=[site]))
    return dists[0] if dists else None


def _editable_source() -> Path | None:
    dist = _installed_dist()
    if dist is None:
        return None
    info = json.loads(dist.read_text("direct_url.json") or "{}")
    if not info.get("dir_info", {}).get("editable") or not info.get("url", "").startswith("file://"):
        return None
    return Path(info["url"].removeprefix("file://"))


def test_editable_install_imports_mapped_packages(tmp_path: Path) -> None:
    source = _editable_source()
    # `make test` installs cloudfs editable from this checkout: anything else is a missing step.
    assert source is not None and source.resolve() == REPO.resolve(), (
        f"cloudfs is not installed in editable mode from {REPO} (found: {source}); run `make deps`")
    # -I: no PYTHONPATH, no user site, no cwd on sys.path; run from outside the checkout.
    out = _probe(["-I"], cwd=tmp_path)
    files = out["files"]
    assert Path(files["cloudfs.layout"]) == REPO / "cloudfs" / "layout.py"
    assert Path(files["cloudfs.backends"]) == REPO / "backends" / "__init__.py"
    assert Path(files["cloudfs.backends.base"]) == REPO / "backends" / "base.py"
    assert Path(files["cloudfs.cache.block_cache"]) == REPO / "cache" / "block_cache.py"
    # (the editable finder adds a placeholder entry to a namespace package's __path__)
    assert [Path(p) for p in out["cache_path"] if Path(p).is_dir()] == [REPO / "cache"]
    assert out["generic"] == {"backends": None, "cache": None}


def test_editable_install_puts_no_generic_names_in_site_packages() -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    assert _generic_entries(site) == []
    dist = _installed_dist()
    assert dist is not None, "cloudfs is not installed in this environment; run `make deps`"
    top_level = (dist.read_text("top_level.txt") or "cloudfs").split()
    assert top_level == ["cloudfs"]


# --------------------------------------------------------------------------- wheel

def _copy_sources(dest: Path) -> Path:
    """The files a build needs, without the checkout's build/, *.egg-info or caches."""
    src = dest / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.exists():
            shutil.copy2(path, src / name)
    return src


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return subprocess.run([PY, "-m", "pip", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_sources(tmp)
    out = tmp / "dist"
    # Offline first: the venv's own setuptools (needs bdist_wheel: setuptools >= 70.1, or the
    # `wheel` package).  Otherwise an isolated build, which fetches the pyproject's
    # build-system requirements from the configured package index.
    proc = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(src))
    if proc.returncode != 0:
        first = proc.stderr[-2000:]
        proc = _pip("wheel", "--no-deps", "-w", str(out), str(src))
        assert proc.returncode == 0, (
            f"offline build failed:\n{first}\nisolated build failed:\n{proc.stderr[-4000:]}")
    wheels = list(out.glob("cloudfs-*.whl"))
    assert len(wheels) == 1, proc.stdout
    return wheels[0]


def test_wheel_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert top - dist_info == {"cloudfs"}, sorted(top)
    assert not [n for n in names if n.startswith(("backends/", "cache/", "backends.", "cache."))]
    for required in ("cloudfs/layout.py", "cloudfs/backends/__init__.py", "cloudfs/backends/base.py",
                     "cloudfs/cache/block_cache.py"):
        assert required in names
    info = next(iter(dist_info))
    if f"{info}/top_level.txt" in names:
        assert zipfile.ZipFile(wheel).read(f"{info}/top_level.txt").decode().split() == ["cloudfs"]
    metadata_text = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata_text  # the SPDX form, not the deprecated table
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "cloudfs = cloudfs.cli:main" in entry_points
    assert "mount.cloudfs = cloudfs.mount_helper:main" in entry_points


def test_wheel_installs_and_imports(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    proc = _pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel))
    assert proc.returncode == 0, proc.stderr
    assert _generic_entries(target) == []
    assert {p.name for p in target.iterdir()} - {"bin"} == {"cloudfs", wheel.name.split("-")[0] + "-"
                                                             + wheel.name.split("-")[1] + ".dist-info"}
    # -S: the venv's site-packages is not processed, so its .pth files (the editable finder
    # that maps cloudfs to this checkout) stay out; it is on PYTHONPATH only for the
    # dependencies (trio, tenacity), after the installed wheel.  -P: no cwd on sys.path.
    deps = sysconfig.get_paths()["purelib"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), deps]))
    env.pop("PYTHONHOME", None)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    out = _probe(["-S", "-P"], cwd=cwd, env=env)
    for name, file in out["files"].items():
        # cloudfs.cache has no __init__.py (a namespace package): no __file__, its __path__
        # is checked below.
        assert (file is None and name == "cloudfs.cache") or _under(file, target), (name, file)
    assert [Path(p) for p in out["cache_path"]] == [target / "cloudfs" / "cache"]
    assert out["generic"] == {"backends": None, "cache": None}
