"""`make install` puts `cloudfs` and `mount.cloudfs` on PATH, `make demo` installs only the
runtime, and pyproject.toml builds without setuptools' deprecation warnings (issue 14)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cloudfs

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(REPO), "--no-print-directory", *args], capture_output=True,
                          text=True, timeout=300)


def test_make_install_links_the_commands_and_uninstall_removes_only_them(tmp_path: Path) -> None:
    # -o runtime: the venv is there already (this test runs in it); reinstalling it under the
    # running test session is not what is tested here.
    r = make("-o", "runtime", "install", f"PREFIX={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"installed: {tmp_path}/bin/cloudfs {tmp_path}/bin/mount.cloudfs "
                                f"-> {REPO}/.venv/bin/")
    for name in ("cloudfs", "mount.cloudfs"):
        link = tmp_path / "bin" / name
        assert link.is_symlink() and link.resolve() == (REPO / ".venv" / "bin" / name).resolve()
    v = subprocess.run([str(tmp_path / "bin" / "cloudfs"), "--version"], capture_output=True, text=True,
                       timeout=60)
    assert v.returncode == 0 and v.stdout.strip() == f"cloudfs {cloudfs.__version__}", v
    h = subprocess.run([str(tmp_path / "bin" / "mount.cloudfs"), "file:///srv/b", "/mnt/b", "-f",
                        "-o", "noatime,_netdev"], capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and "would run:" in h.stderr, h
    # installing again replaces the links; uninstall removes ours and nothing else
    assert make("-o", "runtime", "install", f"PREFIX={tmp_path}").returncode == 0
    other = tmp_path / "other"
    (other / "bin").mkdir(parents=True)
    (other / "bin" / "cloudfs").write_text("#!/bin/sh\n")
    assert make("uninstall", f"PREFIX={other}").returncode == 0
    assert (other / "bin" / "cloudfs").exists()
    r = make("uninstall", f"PREFIX={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert sorted((tmp_path / "bin").iterdir()) == []


def test_demo_installs_only_the_runtime_and_test_installs_everything() -> None:
    demo = make("-n", "demo").stdout
    assert "install-deps.sh --runtime" in demo, demo
    test = make("-n", "test").stdout
    assert "./scripts/install-deps.sh\n" in test and "--runtime" not in test, test
    script = (REPO / "scripts" / "install-deps.sh").read_text()
    assert "pip install -q -e '.[test]'" in script
    # on an installed venv the runtime step is silent
    r = make("runtime")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r


def test_pyproject_has_no_setuptools_deprecations(tmp_path: Path) -> None:
    probe = (
        "import sys, warnings\n"
        "from setuptools.warnings import SetuptoolsDeprecationWarning\n"
        "warnings.simplefilter('error', SetuptoolsDeprecationWarning)\n"
        "from setuptools.config.pyprojecttoml import apply_configuration\n"
        "from setuptools.dist import Distribution\n"
        "d = apply_configuration(Distribution(), sys.argv[1])\n"
        "print(d.metadata.license_expression, d.metadata.version)\n"
    )
    r = subprocess.run([sys.executable, "-c", probe, str(REPO / "pyproject.toml")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["MIT", cloudfs.__version__]


def test_console_scripts_in_the_venv() -> None:
    """`pip install .` / `pipx install .` put both commands beside the interpreter."""
    for name in ("cloudfs", "mount.cloudfs"):
        assert (VENV_BIN / name).is_file()


def test_make_demo_is_short_and_quiet(tmp_path: Path) -> None:
    """On an installed checkout `make demo` prints the demo, not an installer's log."""
    bucket, mnt = tmp_path / "bucket", tmp_path / "mnt"
    cache_dir = None
    try:
        r = make("demo", f"DEMO_BUCKET={bucket}", f"DEMO_MNT={mnt}")
        assert r.returncode == 0, r.stdout + r.stderr
        out = r.stdout + r.stderr
        assert "Deprecat" not in out and "Traceback" not in out, out
        assert len(out.splitlines()) < 30, out
        assert "README.txt" in out and (mnt / "README.txt").is_file()
        st = subprocess.run([str(VENV_BIN / "cloudfs"), "status", str(mnt), "--json"], capture_output=True,
                            text=True, timeout=60)
        cache_dir = json.loads(st.stdout)["cache"]["dir"]
        r = make("demo-stop", f"DEMO_MNT={mnt}")
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        if cache_dir:  # the default cache directory of this test's own bucket
            shutil.rmtree(cache_dir, ignore_errors=True)
