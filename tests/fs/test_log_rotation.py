"""The daemon's log file: rotated at ``LOG_BYTES``, at most ``LOG_BACKUPS`` old files kept,
every one private (0600: the log names buckets and keys).  In-process, through
``cloudfs.daemon.setup_logging`` as the daemon calls it, with the sizes made small; the root
logger is given back as it was."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudfs import daemon
from cloudfs.options import MountOptions

NOISY = ("botocore", "boto3", "urllib3", "azure", "google", "s3transfer")


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, its handlers, level and the quieted loggers' levels restored after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in NOISY}
    try:
        yield root
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, lvl in levels.items():
            logging.getLogger(name).setLevel(lvl)


def test_the_log_rotates_at_its_size_and_keeps_log_backups_private_files(
        root_logger: logging.Logger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "LOG_BYTES", 2000)
    monkeypatch.setattr(daemon, "LOG_BACKUPS", 3)
    old_umask = os.umask(0)  # the files' mode comes from the handler, not from the umask
    try:
        daemon.setup_logging(MountOptions(), str(tmp_path), foreground=False)
        log = logging.getLogger("cloudfs.test")
        lines = [f"line {i:04d} " + "x" * 90 for i in range(400)]  # about 20 logs' worth
        for line in lines:
            log.info("%s", line)
        for handler in root_logger.handlers:
            handler.flush()
    finally:
        os.umask(old_umask)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cloudfs.log", "cloudfs.log.1", "cloudfs.log.2", "cloudfs.log.3"], names
    for name in names:
        st = (tmp_path / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o600, (name, oct(st.st_mode))
        assert 0 < st.st_size <= 2000, (name, st.st_size)
    # Oldest to newest: .3, .2, .1, the live log; together the most recent lines, none twice.
    kept = [line.split(": ", 1)[1] for name in reversed(names)
            for line in (tmp_path / name).read_text().splitlines()]
    assert kept == lines[-len(kept):]
    assert len(kept) < len(lines)  # older files than LOG_BACKUPS were dropped
