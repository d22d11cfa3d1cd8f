"""The shipped unit files (systemd-analyze verify) and fstab lines (systemd's own generator), offline."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.systemd.harness import CLOUDFS, FSTAB_GENERATOR, UNITS_SRC, render_unit


def test_systemd_tools_are_installed():
    # `make deps` installs Debian's systemd package: a missing tool is a failure, not a skip.
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: run `make deps`"
    assert os.access(FSTAB_GENERATOR, os.X_OK), f"{FSTAB_GENERATOR} missing: run `make deps`"

SHIPPED = sorted(p.relative_to(UNITS_SRC).as_posix() for p in UNITS_SRC.rglob("*") if p.is_file())


def test_all_expected_units_are_shipped():
    assert {"cloudfs@.service", "user/cloudfs@.service", "mnt-photos.mount", "mnt-photos.automount"} <= set(
        SHIPPED
    )


def verify(unit_dir: Path, unit: str, user: bool = False, tmp: Path | None = None):
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0"}
    args = ["systemd-analyze", "verify", "--man=no"]
    if not user:
        return subprocess.run([*args, str(unit_dir / unit)], capture_output=True, text=True, timeout=60,
                              env=env)
    assert tmp
    # A short XDG_RUNTIME_DIR: the user units' socket paths below it must fit in 108 bytes, which
    # a tmp_path need not (pytest-xdist's are longer).
    with tempfile.TemporaryDirectory(prefix="xdg-", dir="/tmp") as runtime:
        env["XDG_RUNTIME_DIR"] = runtime
        args.insert(1, "--user")
        return subprocess.run([*args, str(unit_dir / unit)], capture_output=True, text=True, timeout=60,
                              env=env)


@pytest.mark.parametrize("name", SHIPPED)
def test_systemd_analyze_verify_is_silent(name, tmp_path):
    # verify exits 0 on bad values and only warns on stderr: any stderr output is a failure.
    # ExecStart= must exist to verify, so check the unit as install_units writes it.
    d = tmp_path / "units"
    d.mkdir()
    text = render_unit(name)
    assert CLOUDFS in text or "ExecStart" not in text
    (d / Path(name).name).write_text(text)
    unit = Path(name).name.replace("@.", "@photos.")  # verify a template through an instance
    r = verify(d, unit, user=name.startswith("user/"), tmp=tmp_path)
    assert r.stderr == "" and r.returncode == 0, f"{name}:\n{r.stderr}"


def test_verify_really_checks_values(tmp_path):
    # guard against a verify that passes because it read nothing
    d = tmp_path / "units"
    d.mkdir()
    bad = render_unit("cloudfs@.service").replace("KillMode=mixed", "KillMode=bogus")
    (d / "cloudfs@.service").write_text(bad)
    assert "bogus" in verify(d, "cloudfs@photos.service").stderr


def unit_file(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


def test_service_unit_contract():
    u = unit_file(UNITS_SRC / "cloudfs@.service")
    s = u["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["ExecStart"] == "/usr/local/bin/cloudfs mount --profile %i --foreground"
    # ExecStop flushes pending uploads and unmounts (waiting for the mount process to exit);
    # "-": after an unmount from outside there is nothing to stop, which is not a failure
    assert s["ExecStop"] == "-/usr/local/bin/cloudfs umount --profile %i"
    assert s["TimeoutStopSec"] == "15min"
    assert s["Restart"] == "on-failure"
    assert "network-online.target" in u["Unit"]["After"] and "network-online.target" in u["Unit"]["Wants"]
    # any of these would put the FUSE mount into a private mount namespace, invisible outside
    text = (UNITS_SRC / "cloudfs@.service").read_text()
    for key in ("PrivateTmp", "ProtectSystem", "ProtectHome", "ReadWritePaths", "PrivateDevices",
                "PrivateMounts", "ProtectKernelTunables", "MountFlags", "PrivateUsers"):  # fmt: skip
        assert f"\n{key}=" not in text, key
    assert "CAP_SYS_ADMIN" in s["CapabilityBoundingSet"]
    assert s["DeviceAllow"] == "/dev/fuse rw"


def test_user_unit_contract():
    s = unit_file(UNITS_SRC / "user" / "cloudfs@.service")["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["ExecStart"] == "/usr/local/bin/cloudfs mount --profile %E/cloudfs/%i.conf --foreground"
    assert s["ExecStop"] == "-/usr/local/bin/cloudfs umount --profile %E/cloudfs/%i.conf"
    assert s["TimeoutStopSec"] == "15min"
    assert "NoNewPrivileges" not in s  # fusermount3 is setuid


# --- fstab generator ---------------------------------------------------------------------------

FSTAB = """\
# cloudfs lines as users write them
s3://my-bucket/photos  /mnt/photos  cloudfs  _netdev,noauto,x-systemd.automount,x-systemd.idle-timeout=10min,cache_size=20G  0 0
file:///srv/bucket     /mnt/local   fuse.cloudfs  ro,_netdev,nofail,x-systemd.mount-timeout=20s,cache_size=1G  0 0
s3://b/x\\040y  /mnt/with\\040space  cloudfs  _netdev,x-systemd.automount,x-systemd.idle-timeout=30  0 0
"""  # noqa: E501


@pytest.fixture
def generated(tmp_path) -> Path:
    assert os.access(FSTAB_GENERATOR, os.X_OK), f"{FSTAB_GENERATOR} missing: run `make deps`"
    fstab = tmp_path / "fstab"
    fstab.write_text(FSTAB)
    out = [tmp_path / n for n in ("normal", "early", "late")]
    for d in out:
        d.mkdir()
    env = {"PATH": os.environ["PATH"], "SYSTEMD_FSTAB": str(fstab), "SYSTEMD_PROC_CMDLINE": "",
           "SYSTEMD_LOG_LEVEL": "info"}  # fmt: skip
    r = subprocess.run([FSTAB_GENERATOR, *map(str, out)], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    return out[0]


def test_automount_line(generated):
    m = unit_file(generated / "mnt-photos.mount")
    assert m["Mount"]["What"] == "s3://my-bucket/photos"
    assert m["Mount"]["Where"] == "/mnt/photos"
    assert m["Mount"]["Type"] == "cloudfs"  # -> mount -t cloudfs -> /sbin/mount.cloudfs
    assert m["Mount"]["Options"] == FSTAB.splitlines()[1].split()[3]
    # _netdev makes it a remote mount: ordered before remote-fs.target (and, when loaded, after
    # network-online.target; that implicit dependency is checked under the real systemd)
    assert m["Unit"]["Before"] == "remote-fs.target"
    a = unit_file(generated / "mnt-photos.automount")
    assert a["Automount"]["Where"] == "/mnt/photos"
    assert a["Automount"]["TimeoutIdleSec"] == "10min"
    # the automount (not the mount) is what remote-fs.target pulls in
    link = generated / "remote-fs.target.requires" / "mnt-photos.automount"
    assert link.is_symlink()
    assert not (generated / "remote-fs.target.requires" / "mnt-photos.mount").exists()
    assert not (generated / "remote-fs.target.wants" / "mnt-photos.mount").exists()


def test_plain_network_mount_line(generated):
    m = unit_file(generated / "mnt-local.mount")
    assert m["Mount"]["Type"] == "fuse.cloudfs"
    assert m["Mount"]["What"] == "file:///srv/bucket"
    assert m["Mount"]["TimeoutSec"] == "20s"  # x-systemd.mount-timeout
    assert m["Mount"]["Options"].startswith("ro,_netdev,nofail")
    # nofail: wanted (not required) by remote-fs.target, so a failure does not fail boot
    assert (generated / "remote-fs.target.wants" / "mnt-local.mount").is_symlink()
    assert not (generated / "mnt-local.automount").exists()


def test_escaped_space_in_fstab(generated):
    name = "mnt-with\\x20space"
    m = unit_file(generated / f"{name}.mount")
    assert m["Mount"]["Where"] == "/mnt/with space"
    assert m["Mount"]["What"] == "s3://b/x y"
    a = unit_file(generated / f"{name}.automount")
    assert a["Automount"]["TimeoutIdleSec"] == "30s"
