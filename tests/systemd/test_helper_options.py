"""mount.cloudfs without mounting: argv parsing, option filtering, fake mode, install/uninstall."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cloudfs import mount_helper as mh
from cloudfs.mount_helper import UsageError, filter_options, parse_argv

FSTAB_OPTS = "_netdev,noauto,x-systemd.automount,x-systemd.idle-timeout=10min,cache_size=20G"


def test_parse_mount8_calling_convention():
    inv = parse_argv(["s3://b/p", "/mnt/p", "-sfnv", "-o", "ro,cache_size=5G"])
    assert (inv.source, inv.mountpoint, inv.fstype) == ("s3://b/p", "/mnt/p", "cloudfs")
    assert inv.sloppy and inv.fake and inv.no_mtab and inv.verbose
    assert inv.options == ["ro", "cache_size=5G"]


def test_flags_anywhere_attached_values_and_repeated_o():
    inv = parse_argv(["-n", "-oro", "s3://b", "-v", "/mnt/b", "-o", "a=1", "-o", "b=2,,c"])
    assert (inv.source, inv.mountpoint) == ("s3://b", "/mnt/b")
    assert inv.options == ["ro", "a=1", "b=2", "c"]
    assert inv.no_mtab and inv.verbose and not inv.fake


def test_type_from_program_name_and_t_flag():
    assert parse_argv(["s3://b", "/m"], "/sbin/mount.fuse.cloudfs").fstype == "fuse.cloudfs"
    assert parse_argv(["s3://b", "/m"], "/sbin/mount.cloudfs").fstype == "cloudfs"
    assert parse_argv(["s3://b", "/m", "-t", "fuse.cloudfs"]).fstype == "fuse.cloudfs"
    # old fuse fstab style: "cloudfs#URL"
    assert parse_argv(["cloudfs#s3://b", "/m"], "mount.fuse.cloudfs").source == "s3://b"


@pytest.mark.parametrize(
    "args",
    [[], ["s3://b"], ["s3://b", "/m", "/x"], ["s3://b", "/m", "-x"], ["s3://b", "/m", "-o"],
     ["s3://b", "/m", "-t", "nfs"], ["s3://b", "/m", "-N", "/proc/1/ns/mnt"]],
)  # fmt: skip
def test_bad_invocations_are_usage_errors(args):
    with pytest.raises(UsageError):
        parse_argv(args)


def test_fstab_options_are_filtered():
    f = filter_options(FSTAB_OPTS.split(","))
    assert f.passed == ["cache_size=20G"]
    assert set(f.dropped) == {"_netdev", "noauto", "x-systemd.automount", "x-systemd.idle-timeout=10min"}


def test_mount_and_systemd_options_dropped():
    items = ["defaults", "auto", "nofail", "user", "users", "nouser", "owner", "group", "comment=hi there",
             "X-mount.mkdir", "x-gvfs-show", "x-systemd.mount-timeout=5s", "_netdev"]
    f = filter_options(items)
    assert f.passed == []
    assert f.dropped == items


def test_nosuid_nodev_are_enforced_not_passed():
    # mount.fuse3 adds dev,suid when root mounts fuse.cloudfs: they must not reach cloudfs.
    f = filter_options(["dev", "suid", "rw", "exec", "async", "nodev", "nosuid", "allow_other"])
    assert f.passed == ["allow_other"]


def test_ro_kept_and_last_of_ro_rw_wins():
    assert filter_options(["rw", "ro", "cache_size=1G"]).passed == ["ro", "cache_size=1G"]
    assert filter_options(["ro", "rw"]).passed == []
    assert filter_options(["cache_size=1G", "ro"]).passed == ["ro", "cache_size=1G"]


def test_later_value_wins_and_unknown_passed_through():
    f = filter_options(["cache_size=1G", "endpoint=http://x", "cache_size=2G", "bogus"])
    assert f.passed == ["endpoint=http://x", "cache_size=2G", "bogus"]  # cloudfs refuses bogus itself


def test_sloppy_drops_unknown_options_only_when_sloppy():
    known = mh.cli_known_options("s3://bucket")
    assert known and {"cache_size", "endpoint", "ro"} <= known
    f = filter_options(["bogus", "cache_size=1G", "endpoint=http://x"], known, sloppy=True)
    assert f.passed == ["cache_size=1G", "endpoint=http://x"]
    assert f.dropped == ["bogus"]
    assert "bogus" in filter_options(["bogus"], known, sloppy=False).passed


def test_env_file_is_consumed_by_the_helper():
    f = filter_options(["env_file=/etc/cloudfs/p.env", "ro"])
    assert f.env_file == "/etc/cloudfs/p.env" and f.passed == ["ro"]
    with pytest.raises(UsageError):
        filter_options(["env_file="])


def test_command_runs_the_cloudfs_console_script_beside_python():
    inv = parse_argv(["file:///srv/b", "/mnt/b", "-o", "ro,_netdev,cache_size=64M"])
    cmd = mh.build_command(inv, filter_options(inv.options))
    assert cmd[0] == str(Path(sys.executable).parent / "cloudfs")
    assert cmd[1:] == ["mount", "file:///srv/b", "/mnt/b", "-o", "ro,cache_size=64M"]
    assert "--foreground" not in cmd  # the CLI forks and returns once the mount is ready


def run_helper(*args: str, name: str = "mount.cloudfs", env: dict[str, str] | None = None):
    script = Path(sys.executable).parent / "mount.cloudfs"
    e = {**os.environ, **(env or {}), "CLOUDFS_HELPER_NAME": name}
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=30, env=e)


def test_fake_mode_prints_and_mounts_nothing(tmp_path):
    r = run_helper("file:///srv/b", str(tmp_path), "-fv", "-o", f"{FSTAB_OPTS},ro,dev,suid")
    assert r.returncode == 0, r.stderr
    dropped = "_netdev,noauto,x-systemd.automount,x-systemd.idle-timeout=10min,dev,suid"
    assert f"ignoring options: {dropped}" in r.stderr
    assert f"mount file:///srv/b {tmp_path} -o ro,cache_size=20G" in r.stderr
    assert not os.path.ismount(tmp_path)


def test_usage_error_exit_status_and_message():
    r = run_helper("only-one-arg")
    assert r.returncode != 0
    assert r.stderr.startswith("mount.cloudfs: expected SOURCE and MOUNTPOINT")
    r = run_helper("s3://b", "/m", "-N", "x", name="mount.fuse.cloudfs")
    assert r.returncode != 0 and "-N" in r.stderr


def test_env_file_permissions_checked_before_mounting(tmp_path):
    env = tmp_path / "creds.env"
    env.write_text("AWS_SECRET_ACCESS_KEY=s3cret\n")
    env.chmod(0o644)
    r = run_helper("s3://b", str(tmp_path), "-f", "-o", f"env_file={env}")
    assert r.returncode != 0 and "chmod 600" in r.stderr
    env.chmod(0o600)
    r = run_helper("s3://b", str(tmp_path), "-f", "-o", f"env_file={env}")
    assert r.returncode == 0, r.stderr


def test_install_and_uninstall_in_a_prefix(tmp_path):
    written = mh.install(tmp_path)
    assert sorted(os.path.basename(p) for p in written) == ["mount.cloudfs", "mount.fuse.cloudfs"]
    for p in written:
        st = os.stat(p)
        assert stat.S_IMODE(st.st_mode) == 0o755
        text = Path(p).read_text()
        assert text.startswith("#!/bin/sh\n") and mh.MARKER in text
        assert str(Path(sys.executable).parent / "mount.cloudfs") in text
    # the installed wrapper works and knows which name it was installed as
    r = subprocess.run([str(tmp_path / "mount.fuse.cloudfs"), "cloudfs#s3://b", "/m", "-f"],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0 and "mount s3://b /m" in r.stderr, r.stderr
    assert mh.install(tmp_path) == written  # idempotent
    assert sorted(mh.uninstall(tmp_path)) == sorted(written)
    assert not any(os.path.exists(p) for p in written)
    assert mh.uninstall(tmp_path) == []


def test_install_refuses_to_overwrite_a_foreign_helper(tmp_path):
    foreign = tmp_path / "mount.cloudfs"
    foreign.write_text("#!/bin/sh\necho someone else's\n")
    with pytest.raises(FileExistsError):
        mh.install(tmp_path)
    assert mh.uninstall(tmp_path) == []
    assert foreign.read_text().startswith("#!/bin/sh\necho someone")


def test_install_units_rewrites_the_cloudfs_path(tmp_path):
    (path,) = mh.install_units(tmp_path, cloudfs_bin="/opt/cloudfs/bin/cloudfs")
    text = Path(path).read_text()
    assert "ExecStart=/opt/cloudfs/bin/cloudfs mount --profile %i --foreground" in text
    assert mh.UNIT_BIN not in text
    (upath,) = mh.install_units(tmp_path / "user", user=True, cloudfs_bin="/opt/c")
    assert "ExecStart=/opt/c mount --profile %E/cloudfs/%i.conf --foreground" in Path(upath).read_text()
    assert mh.uninstall_units(tmp_path) == [path]
