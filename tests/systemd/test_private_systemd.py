"""End to end under a real systemd as PID 1 in isolated namespaces (see harness.PrivateSystemd).

One private systemd serves the module; run these tests one at a time (not under xdist).
Scenarios: an fstab automount on a local bucket (mounted on first access, unmounted after
the idle timeout, mounted again), ``cloudfs@NAME.service`` (READY, stop flushes pending
uploads), and failing mounts/services with a clear journal message.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from cloudfs import mount_helper
from tests.systemd.harness import PrivateSystemd, render_unit, systemd_unavailable_reason, wait_for

pytestmark = pytest.mark.systemd

FSTAB = """\
file:///srv/bucket-auto /mnt/auto cloudfs _netdev,noauto,x-systemd.automount,x-systemd.idle-timeout=3s,x-systemd.mount-timeout=20s,cache_dir=/var/cache/cloudfs-auto,cache_size=64M 0 0
file:///srv/no-such-bucket /mnt/broken cloudfs _netdev,noauto,x-systemd.mount-timeout=10s 0 0
file:///srv/bucket-auto /mnt/badorder cloudfsbad _netdev,noauto,x-systemd.automount,x-systemd.mount-timeout=4s,cache_dir=/var/cache/cloudfs-bad,cache_size=64M 0 0
"""  # noqa: E501

# Negative control for the automount test: the same helper, but detached into a new session
# (setsid) before the FUSE mount is made -- the order issue 7 measured to deadlock under a
# pending automount.  If this did NOT hang, the automount test could not catch a regression.
BAD_ORDER_HELPER = """\
#!/bin/sh
exec setsid /usr/sbin/mount.cloudfs "$@"
"""

SVC_CONF = """\
url = "file:///srv/bucket-svc"
mountpoint = "/mnt/svc"
options = { cache_dir = "/var/cache/cloudfs-svc", cache_size = "64M", writeback_delay = "600" }
[environment]
CLOUDFS_TEST_TOKEN = "not-a-real-secret"
"""

LEAKY_CONF = SVC_CONF.replace("/mnt/svc", "/mnt/leaky")


@pytest.fixture(scope="module")
def sd():
    reason = systemd_unavailable_reason()
    if reason:
        print(f"skipping the private-systemd tier: {reason}")
        pytest.skip(reason)
    with tempfile.TemporaryDirectory() as d:
        helpers = {f"/usr/sbin/{Path(p).name}": (Path(p).read_text(), 0o755) for p in mount_helper.install(d)}
    seed: dict[str, object] = {
        **helpers,
        "/usr/sbin/mount.cloudfsbad": (BAD_ORDER_HELPER, 0o755),
        "/etc/fstab": FSTAB,
        "/etc/systemd/system/cloudfs@.service": render_unit("cloudfs@.service"),
        "/etc/cloudfs/svc.conf": (SVC_CONF, 0o600),
        "/etc/cloudfs/leaky.conf": (LEAKY_CONF, 0o644),  # credentials readable by all: refused
        "/srv/bucket-auto/hello.txt": "hello from automount\n",
        "/srv/bucket-svc/hello.txt": "hello from the service\n",
    }
    inst = PrivateSystemd(seed, dirs=["/mnt/auto", "/mnt/broken", "/mnt/svc", "/mnt/leaky", "/mnt/badorder"])
    try:
        inst.boot(timeout=90)
        yield inst
    except BaseException:
        print(inst.diagnostics())
        raise
    finally:
        inst.cleanup()


def read(sd: PrivateSystemd, path: str, timeout: float = 40) -> str:
    return sd.run(["cat", path], timeout=timeout).stdout


def test_booted_isolated(sd):
    assert sd.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    root = [m for m in sd.run(["cat", "/proc/self/mountinfo"]).stdout.splitlines() if " / / " in m]
    assert root and " overlay " in root[-1]
    assert sd.show("mnt-auto.automount", "ActiveState")["ActiveState"] == "active"


def test_fstab_automount_mounts_on_access_and_unmounts_when_idle(sd):
    deps = sd.show("mnt-auto.mount", "After", "Wants", "Before")
    assert "network-online.target" in deps["After"] and "network-online.target" in deps["Wants"]
    assert "remote-fs.target" in deps["Before"]
    assert sd.cloudfs_mount_at("/mnt/auto") is None
    # first access: systemd runs mount -t cloudfs -> /sbin/mount.cloudfs -> cloudfs mount.  A
    # helper that setsid()s before mounting, or stats the path from a detached process,
    # deadlocks here until x-systemd.mount-timeout (20s).
    t = time.monotonic()
    assert read(sd, "/mnt/auto/hello.txt") == "hello from automount\n"
    assert time.monotonic() - t < 15, "automount took suspiciously long (deadlock until the mount timeout?)"
    m = sd.cloudfs_mount_at("/mnt/auto")
    assert m is not None and {"nosuid", "nodev"} <= m.options
    assert m.fstype == "fuse.cloudfs" and m.source.rstrip("/") == "file:///srv/bucket-auto", m
    assert sd.show("mnt-auto.mount", "ActiveState")["ActiveState"] == "active"
    # idle for x-systemd.idle-timeout=3s: systemd unmounts it
    wait_for(lambda: sd.cloudfs_mount_at("/mnt/auto") is None, 40, "the idle automount to be unmounted", 0.5)
    # and the next access mounts it again
    assert read(sd, "/mnt/auto/hello.txt") == "hello from automount\n"
    assert sd.cloudfs_mount_at("/mnt/auto") is not None
    assert "Failed" not in sd.journal("mnt-auto.mount")


def test_automount_detects_the_wrong_daemonize_order(sd):
    """The automount test above is a real regression test: setsid() before the mount hangs."""
    assert sd.show("mnt-badorder.automount", "ActiveState")["ActiveState"] == "active"
    t = time.monotonic()
    r = sd.run(["timeout", "30", "cat", "/mnt/badorder/hello.txt"], check=False, timeout=40)
    elapsed = time.monotonic() - t
    # it hangs until x-systemd.mount-timeout=4s, then systemd kills the helper and the access fails
    assert r.returncode != 0 and r.stdout == "", (r, sd.journal("mnt-badorder.mount"))
    assert elapsed >= 3.5, f"the wrong order did not hang ({elapsed:.1f}s): the automount test proves nothing"
    wait_for(lambda: sd.show("mnt-badorder.mount", "ActiveState")["ActiveState"] in ("failed", "inactive"),
             30, "the timed-out mount unit to settle")  # fmt: skip
    # (PID 1 logs to the console here, so ask for the result rather than grepping the journal)
    assert sd.show("mnt-badorder.mount", "Result")["Result"] == "timeout"
    assert sd.cloudfs_mount_at("/mnt/badorder") is None


def test_service_ready_and_stop_flushes_pending_uploads(sd):
    sd.systemctl("start", "cloudfs@svc.service", timeout=90)  # returns once READY=1 arrived
    props = sd.show("cloudfs@svc.service", "ActiveState", "StatusText", "Type", "MainPID")
    assert props["ActiveState"] == "active", sd.journal("cloudfs@svc.service")
    assert "Mounted" in props["StatusText"]
    # the mount is in the system's namespace, not a private one of the service
    m = sd.cloudfs_mount_at("/mnt/svc")
    assert m is not None and {"nosuid", "nodev"} <= m.options
    assert read(sd, "/mnt/svc/hello.txt") == "hello from the service\n"
    sd.sh("echo 'pending at stop' > /mnt/svc/pending.txt", timeout=30)
    # writeback_delay=600: the content is still pending (create may have put an empty object)
    assert sd.run(["test", "-s", "/srv/bucket-svc/pending.txt"], check=False).returncode != 0
    assert "umount --profile svc" in sd.show("cloudfs@svc.service", "ExecStop")["ExecStop"]
    sd.systemctl("stop", "cloudfs@svc.service", timeout=180)
    after = sd.show("cloudfs@svc.service", "ActiveState", "Result", "ExecMainStatus")
    assert after["ActiveState"] == "inactive" and after["Result"] == "success", (after, sd.journal())
    assert after["ExecMainStatus"] == "0", after
    # `systemctl stop` returned only after the upload: ExecStop waits for the mount process
    assert read(sd, "/srv/bucket-svc/pending.txt") == "pending at stop\n"
    assert sd.cloudfs_mount_at("/mnt/svc") is None
    log = sd.journal("cloudfs@svc.service")
    assert "flushing pending uploads" in log, log
    assert "cloudfs: " not in log.replace("cloudfs: mounted", "").replace("cloudfs: signal", ""), log


def test_service_unmounted_from_outside_stops_cleanly(sd):
    sd.systemctl("start", "cloudfs@svc.service", timeout=90)
    assert sd.cloudfs_mount_at("/mnt/svc") is not None
    sd.sh("echo 'pending at umount' > /mnt/svc/outside.txt", timeout=30)
    sd.run(["umount", "/mnt/svc"], timeout=60)
    # the mount process uploads what is pending and exits 0; ExecStop then finds nothing to
    # unmount, which must neither fail the unit nor make Restart=on-failure mount it again
    wait_for(lambda: sd.show("cloudfs@svc.service", "ActiveState")["ActiveState"] == "inactive", 60,
             "the service to stop after the outside unmount", 0.3)  # fmt: skip
    after = sd.show("cloudfs@svc.service", "Result", "NRestarts", "ExecMainStatus")
    assert after == {"Result": "success", "NRestarts": "0", "ExecMainStatus": "0"}, (after, sd.journal())
    assert read(sd, "/srv/bucket-svc/outside.txt") == "pending at umount\n"
    assert sd.cloudfs_mount_at("/mnt/svc") is None


def test_failing_mount_fails_the_unit_with_a_clear_message(sd):
    r = sd.systemctl("start", "mnt-broken.mount", timeout=60, check=False)
    assert r.returncode != 0
    assert sd.show("mnt-broken.mount", "ActiveState")["ActiveState"] == "failed"
    log = sd.journal("mnt-broken.mount")
    assert "/srv/no-such-bucket" in log, log
    assert sd.cloudfs_mount_at("/mnt/broken") is None


def test_service_refuses_world_readable_credentials(sd):
    r = sd.systemctl("start", "cloudfs@leaky.service", timeout=60, check=False)
    assert r.returncode != 0
    wait_for(lambda: "chmod 600" in sd.journal("cloudfs@leaky.service"), 15, "the refusal in the journal")
    sd.systemctl("stop", "cloudfs@leaky.service", check=False)  # no restart loop left behind
    assert sd.cloudfs_mount_at("/mnt/leaky") is None
