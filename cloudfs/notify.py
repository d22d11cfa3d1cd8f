"""systemd readiness notification (``sd_notify``) without a dependency.

The protocol is a single datagram of ``KEY=VALUE`` lines sent to the ``AF_UNIX`` socket named
in ``$NOTIFY_SOCKET`` (see sd_notify(3)).  A name starting with ``@`` is an abstract socket:
the ``@`` stands for a leading NUL byte.  When the variable is unset (not started by systemd
with ``Type=notify``) every call is a no-op returning False.

The mount process calls ``sd_notify("READY=1\\nSTATUS=...")`` once the mount is usable and
``sd_notify("STOPPING=1")`` when it starts flushing and unmounting.  With ``NotifyAccess=main``
only the service's main process may send, so the process that runs the FUSE loop must be the
one started by ``ExecStart=`` (``cloudfs mount --foreground``).
"""

from __future__ import annotations

import os
import socket


def _address(name: str) -> str | bytes | None:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None  # vsock and other forms are not used by systemd for services


def sd_notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` assignments) to the service manager.

    Returns True when the datagram was sent, False when there is no manager to tell or the
    send failed (readiness notification must never take the mount down).
    """
    name = os.environ.get("NOTIFY_SOCKET")
    if not name:
        return False
    addr = _address(name)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), addr)
    except OSError:
        return False
    return True
