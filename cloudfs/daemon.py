"""Running a mount: checks, daemonizing, the trio main loop, and clean shutdown.

Order matters (verified on systemd automounts): fork before trio starts; the child calls
pyfuse3.init() first and only then setsid(), and tells the parent over a pipe once the
main loop runs.  Readiness is never checked by walking the mount path: autofs only lets
systemd's own process group through while an automount is pending.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import logging.handlers
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from cloudfs.backends import Backend, open_backend
from cloudfs.backends.base import RetryPolicy
from cloudfs.backends.errors import BackendError, ConfigError
from cloudfs.cache.block_cache import BlockCache, CacheLocked
from cloudfs.cache.file import File
from cloudfs.cache.journal import CacheMismatch
from cloudfs.cache.uploader import Uploader
from cloudfs.cache.writeback import WritebackQueue

from . import meta_store, metrics, notify, status
from .fs import CloudFS, KernelNotify
from .meta_store import MetaStore
from .options import MountOptions, check_paths, default_cache_dir, normalise_url, parse, split_options
from .vfs import VFS, Notify, VfsOptions

log = logging.getLogger("cloudfs")


class MountError(Exception):
    """A one-line error for the user, with the exit code to use."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class MountPlan:
    url: str
    mountpoint: str
    opts: MountOptions
    backend: Backend
    cache_dir: str
    new_cache_dir: bool = False  # this mount made the cache directory (see ``mount``)


def run_dir() -> str:
    base = "/run/cloudfs" if os.getuid() == 0 else os.path.join(
        os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/cloudfs-{os.getuid()}", "cloudfs")
    os.makedirs(base, mode=0o700, exist_ok=True)
    return base


def canonical(path: str) -> str:
    """Resolve symlinks in the parent only: stat()ing a FUSE mountpoint from the daemon
    itself before its loop runs would deadlock."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def pid_file(mountpoint: str) -> str:
    digest = hashlib.sha256(canonical(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(run_dir(), f"{digest}.pid")


def _top_mount(mountpoint: str) -> tuple[str, str] | None:
    """(major:minor, fstype) of the topmost mount on ``mountpoint``, from mountinfo."""
    target = canonical(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == target:
                found = (fields[2], fields[fields.index("-") + 1])
    return found


def is_mounted(mountpoint: str) -> bool:
    """Something other than an autofs trigger (systemd automount) is mounted there."""
    top = _top_mount(mountpoint)
    return top is not None and top[1] != "autofs"


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def prepare(url: str, mountpoint: str, option_text: list[str] | None) -> MountPlan:
    """Everything that can fail before forking: URL, options, mountpoint, FUSE, cache dir."""
    raw = split_options(option_text)
    from urllib.parse import urlsplit

    from cloudfs.backends import backend_class

    url = normalise_url(url)
    try:
        cls = backend_class(urlsplit(url).scheme)
        opts = parse(raw, cls.options)
        backend = open_backend(url, opts.backend)
    except ConfigError as exc:
        raise MountError(str(exc), 2) from None
    except BackendError as exc:
        raise MountError(str(exc), 1) from None
    backend.retry = RetryPolicy(attempts=opts.retries, call_timeout=opts.timeout,
                                metadata_timeout=opts.metadata_timeout)
    backend.limiter.total_tokens = opts.connections
    backend.fixed_content_type = opts.content_type
    # systemd's CacheDirectory= sets $CACHE_DIRECTORY for the service.
    # The default cache dir is keyed on the store (endpoint included), not on the URL text.
    if opts.cache_dir:
        cache_dir = opts.cache_dir
    elif os.environ.get("CACHE_DIRECTORY"):
        cache_dir = os.path.join(os.environ["CACHE_DIRECTORY"], "blocks")
    else:
        cache_dir = default_cache_dir(backend.describe())
    mountpoint = canonical(mountpoint)
    _check_mountpoint(mountpoint, cache_dir, opts.nonempty)
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse module (modprobe fuse) or install fuse3", 19)
    if os.getuid() != 0 and not shutil.which("fusermount3"):
        raise MountError("fusermount3 not found: install the fuse3 package", 19)
    new_cache_dir = not os.path.lexists(cache_dir)
    try:
        check_paths(opts, cache_dir)
    except ConfigError as exc:
        raise MountError(str(exc), 2) from None
    return MountPlan(url, mountpoint, opts, backend, cache_dir, new_cache_dir)


LOG_BYTES = 10 * 1024 * 1024  # the log rotates at this size, keeping LOG_BACKUPS old files
LOG_BACKUPS = 3


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-rotated log whose files are created 0600 (they name buckets and keys)."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", buffering=1)


def log_path(opts: MountOptions, cache_dir: str) -> str:
    return opts.log_file or os.path.join(cache_dir, "cloudfs.log")


def _check_mountpoint(mountpoint: str, cache_dir: str, nonempty: bool) -> None:
    """An empty directory with nothing mounted on it; a dead cloudfs mount of ours is cleared."""
    top = _top_mount(mountpoint)
    busy = f"mountpoint {mountpoint} is busy: something is already mounted there"
    try:
        st = os.stat(mountpoint)
    except OSError as exc:
        if top is None:
            raise MountError(f"mountpoint {mountpoint} does not exist or is not a directory", 2) from None
        if exc.errno != errno.ENOTCONN:  # e.g. EACCES: another user's FUSE mount
            raise MountError(busy, 16) from None
        _clear_stale(mountpoint, cache_dir, top[1])
        top = _top_mount(mountpoint)
        st = os.stat(mountpoint)
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {mountpoint} does not exist or is not a directory", 2)
    if top is not None and top[1] != "autofs":
        raise MountError(busy, 16)
    # Never list an autofs trigger (a systemd automount): that would wait for this very mount.
    if top is not None or nonempty:
        return
    try:
        entries = os.listdir(mountpoint)
    except OSError as exc:
        raise MountError(f"mountpoint {mountpoint}: {exc.strerror}", 2) from None
    if entries:
        raise MountError(f"mountpoint {mountpoint} is not empty (its files would be hidden); "
                         "use -o nonempty to mount over them", 2)


def _clear_stale(mountpoint: str, cache_dir: str, fstype: str) -> None:
    """"Transport endpoint is not connected": a FUSE mount whose daemon is gone.  Detach it only
    if it is provably ours and dead: a cloudfs mount, its pid file's process gone, and the
    cache directory's lock free (a live mount holds it)."""
    try:
        with open(pid_file(mountpoint)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        pid = 0
    hint = f"unmount it with `fusermount3 -uz {mountpoint}`"
    if fstype != "fuse.cloudfs":
        raise MountError(f"mountpoint {mountpoint}: transport endpoint is not connected (a dead {fstype} "
                         f"mount, not cloudfs); {hint}", 16)
    if (pid and _alive(pid)) or not _cache_lock_free(cache_dir):
        raise MountError(f"mountpoint {mountpoint}: transport endpoint is not connected, but its cloudfs "
                         f"daemon{f' (pid {pid})' if pid and _alive(pid) else ''} still holds the cache "
                         f"directory; stop it or {hint}", 16)
    tool = ["fusermount3", "-uz"] if shutil.which("fusermount3") else ["umount", "-l"]
    subprocess.run([*tool, mountpoint], capture_output=True, check=False)
    if _top_mount(mountpoint) is not None:
        raise MountError(f"mountpoint {mountpoint}: could not clear the dead cloudfs mount; {hint}", 16)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pid_file(mountpoint))
    print(f"cloudfs: cleared the dead cloudfs mount left on {mountpoint} by a crashed daemon",
          file=sys.stderr)


def _cache_lock_free(cache_dir: str) -> bool:
    """No process holds the cache directory's lock (BlockCache.open takes it for the mount's life)."""
    try:
        fd = os.open(os.path.join(cache_dir, "lock"), os.O_RDONLY)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing releases a lock we took
    return True


def setup_logging(opts: MountOptions, cache_dir: str, foreground: bool) -> None:
    level = logging.DEBUG if opts.debug else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    root.handlers.clear()
    if foreground:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        handler = PrivateRotatingFileHandler(log_path(opts, cache_dir), maxBytes=LOG_BYTES,
                                             backupCount=LOG_BACKUPS)
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "azure", "google", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def mount(plan: MountPlan, foreground: bool) -> int:
    """Mount; in the background unless ``foreground``. Returns the exit code.  A mount that
    fails before it is ready leaves no cache directory it made itself behind."""
    try:
        return _mount(plan, foreground)
    except MountError:
        if plan.new_cache_dir:
            _remove_unused(plan.cache_dir)
        raise


# What a mount that failed before it was ready may have put in a cache directory: the backend's
# state, its log.  Anything else (a file's record, cache.json) means it is in use: it stays.
_BEFORE_READY = re.compile(r"backend|cloudfs\.log(\.\d+)?")


def _remove_unused(cache_dir: str) -> None:
    with contextlib.suppress(OSError):
        if all(_BEFORE_READY.fullmatch(name) for name in os.listdir(cache_dir)):
            shutil.rmtree(cache_dir)


def _mount(plan: MountPlan, foreground: bool) -> int:
    os.makedirs(plan.cache_dir, mode=0o700, exist_ok=True)
    if foreground:
        setup_logging(plan.opts, plan.cache_dir, True)
        return _serve(plan, ready_fd=None, detach=False)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        code = 1
        try:
            setup_logging(plan.opts, plan.cache_dir, False)
            code = _serve(plan, ready_fd=write_fd, detach=True)
        except BaseException as exc:  # report anything to the waiting parent
            _report(write_fd, f"error:1:{exc}")
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    if message == "ready":
        return 0
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    _, status, text = message.split(":", 2) if message.startswith("error:") else ("", "1", "")
    raise MountError(text or "the mount process died before it was ready", int(status))


def _report(fd: int | None, message: str) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, message.encode())
        os.close(fd)


def _serve(plan: MountPlan, ready_fd: int | None, detach: bool) -> int:
    state = {"code": 0}

    async def main() -> None:
        opts = plan.opts
        state_dir = os.path.join(plan.cache_dir, "backend")
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        plan.backend.use_state_dir(state_dir)
        try:
            await plan.backend.check()
        except BackendError as exc:
            raise MountError(f"{plan.backend.describe()}: {exc}", 1) from None
        await _warn_if_prefix_missing(plan.backend, foreground=not detach)
        mount = build(plan.backend, plan.cache_dir, opts, KernelNotify())
        try:
            recovered = mount.cache.open()
        except CacheLocked as exc:
            raise MountError(str(exc), 16) from None
        except CacheMismatch as exc:
            raise MountError(str(exc), 2) from None
        cache, uploader, vfs = mount.cache, mount.uploader, mount.vfs
        scrapes = None
        if opts.metrics:
            try:
                scrapes = await metrics.listen(opts.metrics)
            except ConfigError as exc:
                raise MountError(str(exc), 2) from None
        try:
            await plan.backend.recover(recovered.resumed_uploads)
        except BackendError as exc:
            log.warning("could not clean up after the previous mount: %s", exc)
        for key, upload_id in recovered.stale_uploads:
            with contextlib.suppress(BackendError):
                await plan.backend.mpu_abort(key, upload_id)
        fs = CloudFS(vfs)
        fsname = plan.backend.describe().replace(",", "_")
        fuse_opts = {f"fsname={fsname}", "subtype=cloudfs", "nosuid", "nodev", "default_permissions"}
        if opts.read_only:
            fuse_opts.add("ro")
        if opts.allow_other:
            fuse_opts.add("allow_other")
        if opts.atime == "noatime":  # relatime is the kernel's default
            fuse_opts.add("noatime")
        if opts.noexec:
            fuse_opts.add("noexec")
        try:
            pyfuse3.init(fs, plan.mountpoint, fuse_opts)
        except RuntimeError as exc:
            raise MountError(f"cannot mount on {plan.mountpoint}: {exc}", 32) from None
        if detach:
            os.setsid()
            _detach_stdio()
        _raise_readahead(plan.mountpoint)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(vfs.run)
                await vfs.load_root()
                await vfs.recover(recovered.deletions)
                await nursery.start(uploader.run)
                for file in recovered.pending:
                    log.info("recovering pending upload of %s", file.key)
                    mount.queue.schedule(file.fid)
                nursery.start_soon(_main_loop, nursery)
                nursery.start_soon(_on_signals, uploader, nursery)
                nursery.start_soon(mount.reconnect.run)
                if scrapes is not None:
                    registry = metrics.registry_for(metrics.MountCollector(plan.backend, cache, uploader,
                                                                           mount.queue))
                    nursery.start_soon(metrics.serve, scrapes, registry)
                log_at = log_path(opts, plan.cache_dir) if detach else None
                nursery.start_soon(status.serve, status.socket_path(pid_file(plan.mountpoint)),
                                   lambda: status.snapshot(plan.backend, cache, uploader, mount.queue,
                                                           plan.mountpoint, log_at),
                                   uploader.sync)
                await trio.sleep(0)
                _write_pid(plan.mountpoint)
                _report(ready_fd, "ready")
                notify.sd_notify(f"READY=1\nSTATUS=Mounted {plan.backend.describe()} on {plan.mountpoint}")
                log.info("mounted %s on %s", plan.backend.describe(), plan.mountpoint)
        finally:
            with trio.CancelScope(shield=True):
                pyfuse3.close(unmount=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(pid_file(plan.mountpoint))
        # Unmounted from outside (umount/fusermount) too: pending uploads still go up.
        failed = await _flush_before_exit(uploader, progress=not detach)
        if failed:
            log.error("%d file(s) could not be uploaded; they stay in %s and are uploaded on the "
                      "next mount", len(failed), plan.cache_dir)
            state["code"] = 1
        _write_result(plan.mountpoint, failed, plan.cache_dir, cache.stats["lost_bytes"])
        if mount.meta_store is not None:
            mount.meta_store.close()
        cache.close()
        plan.backend.close()

    async def _main_loop(nursery: trio.Nursery) -> None:
        await pyfuse3.main()
        nursery.cancel_scope.cancel()  # unmounted: stop the uploader loop and signal task

    try:
        trio.run(main)
    except MountError as exc:
        _report(ready_fd, f"error:{exc.code}:{exc}")
        if ready_fd is None:
            raise
        return exc.code
    return state["code"]


async def _warn_if_prefix_missing(backend: Backend, foreground: bool) -> None:
    """A typo guard: mounting ``s3://bucket/photso`` gives an empty folder.  Still mounted
    (writing there creates the prefix), but said once, on the terminal and in the log."""
    if not backend.prefix:
        return
    try:
        page = await backend.list_page("", delimiter="/", limit=1)
    except BackendError:
        return  # the mount itself will say what is wrong
    if page.objects or page.prefixes:
        return
    message = (f"warning: nothing exists under {backend.describe()} yet (a typo in the prefix?); "
               "mounting it empty")
    log.warning("%s", message)
    if not foreground:  # in the foreground the log is the terminal already
        print(f"cloudfs: {message}", file=sys.stderr, flush=True)


async def _on_signals(uploader: Uploader, nursery: trio.Nursery) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                continue
            notify.sd_notify("STOPPING=1\nSTATUS=Uploading pending data before unmount")
            log.info("signal %d: flushing pending uploads, then unmounting", signum)
            with trio.move_on_after(3600) as scope:
                await uploader.flush_all()
            if scope.cancelled_caught:
                log.error("flush timed out; pending data stays in the cache for the next mount")
            pyfuse3.terminate()
            return


# While the store does not answer, how often it is asked whether it does again.
PROBE_INTERVAL = 5.0


class Reconnect:
    """Uploads that failed while the store was away go again as soon as it answers, in the
    order they were queued.  Any answer shows that it is back; with nothing else asking (no
    user activity) ``run`` asks it every ``interval`` seconds, and only while it is offline."""

    def __init__(self, backend: Backend, queue: WritebackQueue, interval: float = PROBE_INTERVAL) -> None:
        self.backend = backend
        self.queue = queue
        self.interval = interval
        self._offline = trio.Event()
        backend.watch_reachability(self.changed)

    def changed(self, up: bool) -> None:
        if up:
            self.queue.resume()
        else:
            self._offline.set()

    async def run(self) -> None:
        while True:
            await self._offline.wait()
            self._offline = trio.Event()
            while self.backend.offline_since is not None:
                await trio.sleep(self.interval)
                if self.backend.offline_since is not None:
                    await self.backend.probe()  # one bounded request; an answer calls changed()


@dataclass
class Mount:
    """The pieces of one mount, wired together (nothing global: two mounts never share)."""

    queue: WritebackQueue
    cache: BlockCache
    uploader: Uploader
    vfs: VFS
    reconnect: Reconnect
    meta_store: MetaStore | None = None


def build(backend: Backend, cache_dir: str, opts: MountOptions, notify: Notify) -> Mount:
    """Wire queue, cache, uploader and file system for one mount (the cache is not open yet)."""
    queue = WritebackQueue(delay=opts.writeback_delay, parallel=opts.transfers)
    # The uploader and the VFS need the cache, which calls back into them: the callbacks
    # name them before they exist and run only once all three do.
    uploader: Uploader
    vfs: VFS
    cache = BlockCache(backend, cache_dir, block_size=opts.block_size,
                       max_bytes=opts.cache_size, max_dirty=opts.max_dirty or opts.cache_size // 2,
                       min_free=opts.min_free, readahead_blocks=opts.readahead,
                       store_identity=backend.describe(),
                       on_dirty=lambda f: queue.schedule(f.fid),
                       on_pressure=lambda: uploader.pressure(),
                       complete_upload=lambda f: uploader.flush(f))
    uploader = Uploader(cache, backend, queue,
                        on_conflict=lambda f, old: vfs.on_conflict(f, old),
                        on_uploaded=lambda f: vfs.on_uploaded(f))
    vfs = VFS(backend, cache, uploader,
              VfsOptions(uid=opts.uid, gid=opts.gid, read_only=opts.read_only,
                         attr_timeout=opts.attr_timeout, sync_upload=opts.sync_upload,
                         dir_cache_time=opts.dir_cache_time, dir_cache_entries=opts.dir_cache_entries,
                         readahead_blocks=opts.readahead,
                         file_mode=opts.file_mode, dir_mode=opts.dir_mode),
              intents_dir=os.path.join(cache_dir, "intents"), notify=notify)
    # HEAD results kept across mounts, where listings lack metadata (opened at first use,
    # after cache.open() took the cache directory's lock).
    store = None
    if not backend.capabilities.listing_has_metadata and opts.meta_cache_entries:
        store = MetaStore(os.path.join(cache_dir, meta_store.FILE), opts.meta_cache_entries)
        vfs.meta.store = store
    return Mount(queue, cache, uploader, vfs, Reconnect(backend, queue), store)


async def _flush_before_exit(uploader: Uploader, progress: bool) -> list[File]:
    try:
        return await uploader.flush_all(progress=progress)
    except BackendError as exc:
        log.error("%s", exc)
        return uploader.cache.pending_files()


def result_file(mountpoint: str) -> str:
    return pid_file(mountpoint).removesuffix(".pid") + ".result"


def _write_result(mountpoint: str, failed: list[File], cache_dir: str, lost_bytes: int) -> None:
    """What the unmount left behind, and what this mount could not recover (bytes of a stored
    version that was deleted or replaced elsewhere before they were cached here), for
    ``cloudfs umount`` to report."""
    result = {"files": len(failed), "bytes": sum(f.size for f in failed), "cache_dir": cache_dir,
              "lost_bytes": lost_bytes}
    with contextlib.suppress(OSError), open(result_file(mountpoint), "w") as f:
        json.dump(result, f)


def _write_pid(mountpoint: str) -> None:
    with open(pid_file(mountpoint), "w") as f:
        f.write(str(os.getpid()))


def _detach_stdio() -> None:
    """A daemon must not hold mount(8)'s stdout/stderr pipes open: readers would wait for it."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _raise_readahead(mountpoint: str) -> None:
    """1 MiB kernel read-ahead doubles sequential read speed (measured); root only."""
    top = _top_mount(mountpoint)
    if top is None:
        return
    with contextlib.suppress(OSError):
        with open(f"/sys/class/bdi/{top[0]}/read_ahead_kb", "w") as f:
            f.write("1024")


def unmount(mountpoint: str, timeout: float = 3600.0, lazy: bool = False) -> None:
    """Ask the daemon to upload pending data and unmount; wait until it is gone.

    The kernel's dirty pages are synced first (they reach cloudfs only while the mount is
    attached).  A mount still in use is refused, naming the processes that hold it, unless
    ``lazy``: then it is detached now and the holders keep what they have open.
    """
    mountpoint = canonical(mountpoint)
    if not is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is not mounted", 1)
    _syncfs(mountpoint)
    if not lazy:
        holders = busy_holders(mountpoint)
        if holders:
            raise MountError(f"{mountpoint} is busy (used by {', '.join(holders[:5])}"
                             f"{' and more' if len(holders) > 5 else ''}); close them, or use --lazy", 16)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(result_file(mountpoint))
    try:
        with open(pid_file(mountpoint)) as f:
            pid = int(f.read().strip())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        pid = 0
    if lazy or not pid:
        tool = ["fusermount3", "-u"] if shutil.which("fusermount3") else ["umount"]
        if lazy:
            tool.append("-z" if tool[0] == "fusermount3" else "-l")
        if subprocess.run([*tool, mountpoint], check=False).returncode and not pid:
            raise MountError(f"could not unmount {mountpoint}", 1) from None
    deadline = time.monotonic() + timeout
    progress = _UploadProgress(mountpoint) if sys.stderr.isatty() else None
    try:
        while time.monotonic() < deadline:
            if not is_mounted(mountpoint) and (not pid or not _alive(pid)):
                _check_result(mountpoint)
                return
            if progress is not None:
                progress.update()
            time.sleep(0.1)
    except KeyboardInterrupt:
        raise MountError(f"{mountpoint}: stopped waiting; the upload goes on in the background "
                         f"(cloudfs status {mountpoint})", 130) from None
    finally:
        if progress is not None:
            progress.close()
    raise MountError(f"{mountpoint}: unmount did not finish in {timeout:.0f}s", 1)


def _check_result(mountpoint: str) -> None:
    """The daemon's last word: files it could not upload stay in the cache directory; bytes it
    could not recover are zeros on the store.  Either exits 1."""
    try:
        with open(result_file(mountpoint)) as f:
            result = json.load(f)
        os.unlink(result_file(mountpoint))
    except (OSError, ValueError):
        return
    if result.get("files"):
        raise MountError(f"{result['files']} file(s), {result['bytes']} bytes could not be uploaded; "
                         f"they stay in {result['cache_dir']} and are uploaded on the next mount", 1)
    if result.get("lost_bytes"):
        raise MountError(f"{result['lost_bytes']} bytes of files changed here were lost: their stored "
                         f"version was deleted or replaced elsewhere before they were cached, and they "
                         f"are zeros in the upload (see {result['cache_dir']}/cloudfs.log)", 1)


def _syncfs(mountpoint: str) -> None:
    """syncfs(2) on the mount: the kernel writes back its dirty pages to cloudfs."""
    import ctypes

    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    finally:
        os.close(fd)


def busy_holders(mountpoint: str) -> list[str]:
    """Processes with a file, working directory or root below ``mountpoint`` ("pid (name)")."""
    prefix = mountpoint.rstrip("/") + "/"
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        base = f"/proc/{entry}"
        links = [f"{base}/cwd", f"{base}/root"]
        with contextlib.suppress(OSError):
            links += [f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd")]
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == mountpoint or target.startswith(prefix):
                try:
                    with open(f"{base}/comm") as f:
                        name = f.read().strip()
                except OSError:
                    name = "?"
                out.append(f"pid {entry} ({name})")
                break
    return out


class _UploadProgress:
    """A terminal progress bar of the uploads an unmount waits for (from the status socket)."""

    def __init__(self, mountpoint: str) -> None:
        self.path = status.socket_path(pid_file(mountpoint))
        self.bar: Any = None
        self.total = 0

    def update(self) -> None:
        try:
            pending = status.query(self.path, timeout=1)["uploads"]["pending_bytes"]
        except (OSError, ValueError, KeyError):
            return
        if self.bar is None:
            if not pending:
                return
            from tqdm import tqdm

            self.total = pending
            self.bar = tqdm(total=pending, unit="B", unit_scale=True,
                            desc="cloudfs: uploading before unmount")
        self.total = max(self.total, pending)
        self.bar.total = self.total
        self.bar.n = self.total - pending
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self.bar.total
            self.bar.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False
