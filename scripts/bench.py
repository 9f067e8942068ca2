#!/usr/bin/env python3
"""roomfs benchmark: throughput of a roomfs mount relative to the native disk.

Every result is a ratio target/native measured in the same run: for each round
the workloads run on the native directory and then on the mount, back to back
(native, roomfs, native, roomfs, ...).  The table shows medians over rounds of
the absolute numbers and of the per-round ratios, plus the min..max spread of
the per-round ratios.  Nothing is pass/fail on time; a workload FAILs only when
it raises or produces a wrong result, and then the script exits non-zero.

Usage (normally through scripts/bench, which builds first):
  python3 scripts/bench.py [--rounds N] [--quick] [--peers] [--install-peers]
                           [--workdir DIR] [--json FILE] [--keep]
                           [--seq-mib N] [--files N] [--appends N] [--pwrites N] [--pwrite-mib N]
  python3 scripts/bench.py --store s3 [--s3-targets LIST] [same options]
      roomfs on S3 against native, JuiceFS, rclone, s3fs and a raw S3 client, all on a
      SeaweedFS of the run's own: see bench_lib/s3bench.py and doc/PERFORMANCE.md.
  python3 scripts/bench.py --agents 1,4,8,16 [--agent-files N] [--disks data,loop]
                           [--agents-delete] ...
  python3 scripts/bench.py --store s3 --agents 1,8,16 [--s3-latency-ms MS] ...

--agents runs the concurrency benchmark instead of the workloads below: N agent
processes at once, each creating, writing (4 KiB) and reading back its own files
in its own directory with Python open(), on the mount and on the native disk in
the same rounds; throughput as a ratio to native for each N, and the daemon's
CPU time per operation (utime + stime of the mount process, /proc/PID/stat).
It runs on the data dir's own disk and on a journaled ext4 loop image that it
creates and removes (--disks picks).  See agents_main().
With --store s3 it runs on a SeaweedFS of its own instead, on roomfs, JuiceFS and
s3fs (no native baseline), optionally with --s3-latency-ms MS added to every request
by a proxy, as a store across a network would: see bench_lib/s3bench.py.

Hidden options (for development and comparisons):
  --target {roomfs,bindfs,fuse-overlayfs,rclone}   what the main column measures
  --fs-cmd TEMPLATE  any FUSE command as the main column; placeholders {src}
                     (backing dir), {mnt} (mountpoint), {work} (scratch dir).
                     It may stay in the foreground or daemonize.
  --fs-name NAME     column label for --fs-cmd
  --roomfs-bin PATH  roomfs binary (default: <repo>/target/release/roomfs)
  --baseline-bin PATH  a second roomfs binary measured in the same rounds, as the
                     column "baseline" (A/B comparisons without a second run)
  --baseline-args '...'  mount options of the baseline (default: --roomfs-args);
                     alone, it compares two option sets of one binary
  --timeout S        per workload-group watchdog (default 300 s): on expiry the
                     FUSE connection is aborted and the daemon killed, and the
                     workload is reported as FAIL.
  --mount-timeout S  how long to wait for a mount to appear (default 10 s)
  --fs-unmount-cmd TEMPLATE  first unmount attempt for --fs-cmd (then umount, umount -l)

Method: each round runs five workload groups (seq, files, append, pwrite,
latency); each group runs on every target in turn, in a fresh subdirectory,
before the next group starts, so slow drifts in machine load hit all targets
alike; the order of the targets turns by one each round, so that none always
runs first, or right after the same other one.  Before every timed section os.sync() runs (untimed) so no target pays
for the previous one's dirty pages; caches are never dropped, so seq-read of
the file just written is served from the page cache natively (and, for a FUSE
target, from whatever caching the daemon and kernel do) - as a user would see.
For the main target, files written in the latency group are also checked in
the backing store (DIR/rooms/ID/... for roomfs) after the mount reports them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOM_ID = "bench"

# (workload, unit, target ratio for the main column or None); see LOWER_IS_BETTER
WORKLOADS = [
    ("seq-write", "MB/s", 0.6),
    ("seq-read", "MB/s", 0.8),
    ("create", "files/s", 0.35),
    ("list+stat", "files/s", 0.15),
    ("small-read", "files/s", 0.25),
    ("delete", "files/s", None),
    ("append", "ops/s", 0.1),
    ("random-pwrite", "ops/s", 0.25),
    ("latency", "us", None),  # lower is better; ratio is native/target
]
LOWER_IS_BETTER = {"latency"}
GROUPS = [
    ("seq", ["seq-write", "seq-read"]),
    ("files", ["create", "list+stat", "small-read", "delete"]),
    ("append", ["append"]),
    ("pwrite", ["random-pwrite"]),
    ("latency", ["latency"]),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class WorkloadError(Exception):
    """A workload produced a wrong result."""


class Interrupted(BaseException):
    pass


def stopped_by(e: BaseException) -> str:
    """What ended a run early, logged (a traceback for what no check raised): the run's
    summary says it."""
    if isinstance(e, Interrupted):
        log(f"interrupted by {e}; cleaning up")
        return str(e)
    log(f"error: {e}")
    if not isinstance(e, RuntimeError):
        traceback.print_exc()
    return f"{type(e).__name__}: {e}"


def ignore_signals() -> None:
    """Cleaning up is not to be interrupted."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)


# ---------------------------------------------------------------- mounts ---

def _unescape_mount_field(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounted_paths() -> list[str]:
    with open("/proc/mounts") as f:
        return [_unescape_mount_field(line.split()[1]) for line in f if line.strip()]


def is_mounted(path: str) -> bool:
    # no realpath(): it would lstat() the mountpoint and could block on a hung
    # daemon; all our paths are already canonical (workdir is realpath'd).
    return path in mounted_paths()


def mounts_under(root: str) -> list[str]:
    root = os.path.realpath(root)
    return [m for m in mounted_paths() if m == root or m.startswith(root + "/")]


def fuse_conn_id(path: str) -> str | None:
    """Minor device number of the mount = its /sys/fs/fuse/connections id."""
    # path is canonical already; realpath() would lstat() the mount
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if _unescape_mount_field(fields[4]) == path:
                    return fields[2].split(":")[1]
    except OSError:
        pass
    return None


def run_quiet(cmd: list[str], timeout: float = 20) -> bool:
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout)
        return r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Target:
    """A directory to run workloads in: native, or a FUSE mountpoint."""

    def __init__(self, name: str, base: str):
        self.name = name
        self.base = base
        self.root = base          # where workloads run
        self.proc: subprocess.Popen | None = None
        self.mnt: str | None = None
        self.conn: str | None = None
        self.logfile: str | None = None
        self.unmount_cmd: list[str] | None = None
        self.setup_error: str | None = None
        self.ready = False
        # settle(paths): block until everything written so far (paths: the files written) is
        # stored where the target keeps it, for a file system that uploads after close()
        # returns; returns the seconds that took
        self.settle = None

    # -- lifecycle ------------------------------------------------------
    def setup(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    def teardown(self) -> None:
        pass

    def healthy(self) -> str | None:
        return None

    def abort(self) -> None:
        pass

    def log_tail(self, n: int = 30) -> str:
        return ""

    def backing_path(self, rel: str) -> str | None:
        """Where a file written at root/rel is stored underneath, if known."""
        return None


class NativeTarget(Target):
    pass


class FuseTarget(Target):
    def __init__(self, name: str, base: str, cmd_template: list[str],
                 unmount_cmd: list[str] | None, mount_timeout: float):
        super().__init__(name, base)
        self.src = os.path.join(base, "src")
        self.work = os.path.join(base, "work")
        self.mnt = os.path.join(base, "mnt")
        self.root = self.mnt
        self.logfile = os.path.join(base, "daemon.log")
        self.cmd_template = cmd_template
        self.unmount_tmpl = unmount_cmd
        self.mount_timeout = mount_timeout
        self.backing_root: str | None = None  # set for known file systems
        self.env: dict | None = None  # the daemon's environment (default: ours)

    def backing_path(self, rel: str) -> str | None:
        return os.path.join(self.backing_root, rel) if self.backing_root else None

    def _fmt(self, parts: list[str]) -> list[str]:
        return [p.format(src=self.src, mnt=self.mnt, work=self.work) for p in parts]

    def setup(self) -> None:
        for d in (self.src, self.work, self.mnt):
            os.makedirs(d, exist_ok=True)
        cmd = self._fmt(self.cmd_template)
        log(f"[{self.name}] mounting: {shlex.join(cmd)}")
        with open(self.logfile, "wb") as lf:
            # own session: a terminal Ctrl-C reaches only us; we tear down.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=lf,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=self.env)
        deadline = time.monotonic() + self.mount_timeout
        exited_ok = False
        while time.monotonic() < deadline:
            if is_mounted(self.mnt):
                break
            rc = self.proc.poll()
            if rc is not None and not exited_ok:
                if rc != 0:
                    raise RuntimeError(
                        f"{self.name}: mount command exited with status {rc} before "
                        f"{self.mnt} appeared in /proc/mounts; its output:\n{self.log_tail()}")
                exited_ok = True  # daemonized; keep polling
            time.sleep(0.05)
        else:
            raise RuntimeError(
                f"{self.name}: {self.mnt} did not appear in /proc/mounts within "
                f"{self.mount_timeout:g} s; daemon output:\n{self.log_tail()}")
        if exited_ok or self.proc.poll() is not None:
            self.proc = None  # daemonized: we do not know its pid
        self.conn = fuse_conn_id(self.mnt)
        self.ready = True
        with Watchdog(self, self.mount_timeout, "first stat of the mountpoint") as wd:
            try:
                os.stat(self.mnt)
            except OSError as e:
                raise RuntimeError(f"{self.name}: stat({self.mnt}) failed after mounting: {e}"
                                   + (" (timed out)" if wd.fired.is_set() else "")) from e
        log(f"[{self.name}] mounted at {self.mnt}"
            + (f" (pid {self.proc.pid})" if self.proc else " (daemonized)"))

    def healthy(self) -> str | None:
        if not is_mounted(self.mnt):
            return f"{self.mnt} is no longer mounted"
        if self.proc is not None and self.proc.poll() is not None:
            return f"daemon exited with status {self.proc.returncode}"
        return None

    def abort(self) -> None:
        """Unblock anything stuck in this FUSE mount (watchdog expiry).

        Killing our daemon closes its /dev/fuse fd, which fails every pending
        request with ENOTCONN.  Without a pid (daemonized --fs-cmd) abort the
        connection through fusectl, mounting it just for that if needed."""
        if self.proc is not None and self.proc.poll() is None:
            log(f"[{self.name}] killing daemon pid {self.proc.pid}")
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        if not self.conn:
            return
        ctl = "/sys/fs/fuse/connections"
        mounted_ctl = False
        if not os.path.exists(f"{ctl}/{self.conn}") and os.path.isdir(ctl) and ctl not in mounted_paths():
            mounted_ctl = run_quiet(["mount", "-t", "fusectl", "fusectl", ctl])
        try:
            with open(f"{ctl}/{self.conn}/abort", "w") as f:
                f.write("1")
            log(f"[{self.name}] aborted FUSE connection {self.conn}")
        except OSError as e:
            log(f"[{self.name}] could not abort FUSE connection {self.conn}: {e}")
        finally:
            if mounted_ctl:
                run_quiet(["umount", ctl])

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.logfile, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
            return "\n".join("    " + l for l in lines[-n:]) or "    (no output)"
        except OSError:
            return "    (no log)"

    def teardown(self) -> None:
        mnt = self.mnt
        attempts: list[list[str]] = []
        if self.unmount_tmpl:
            attempts.append(self._fmt(self.unmount_tmpl))
        attempts += [["umount", mnt], ["umount", "-l", mnt]]
        for cmd in attempts:
            if not is_mounted(mnt):
                break
            ok = run_quiet(cmd)
            if not ok and cmd[:2] != ["umount", "-l"]:
                log(f"[{self.name}] '{shlex.join(cmd)}' failed")
            for _ in range(50):
                if not is_mounted(mnt):
                    break
                time.sleep(0.1)
        if is_mounted(mnt):
            log(f"[{self.name}] WARNING: {mnt} is still mounted")
        p = self.proc
        if p is not None:
            try:
                p.wait(timeout=10 if self.ready else 0.5)
            except subprocess.TimeoutExpired:
                log(f"[{self.name}] daemon pid {p.pid} still running; SIGTERM")
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    log(f"[{self.name}] SIGKILL pid {p.pid}")
                    p.kill()
                    p.wait()
            if p.returncode not in (0, None, -signal.SIGTERM):
                log(f"[{self.name}] daemon exited with status {p.returncode}")
            self.proc = None


class OverlayTarget(FuseTarget):
    def setup(self) -> None:
        os.makedirs(os.path.join(self.work, "lower"), exist_ok=True)
        os.makedirs(os.path.join(self.work, "ovl"), exist_ok=True)
        super().setup()


def make_target(kind: str, base: str, args) -> Target:
    if kind == "native":
        return NativeTarget("native", base)
    if kind in ("roomfs", "baseline"):
        binary = args.roomfs_bin or os.path.join(REPO, "target", "release", "roomfs")
        extra = args.roomfs_args
        if kind == "baseline":
            binary = args.baseline_bin or binary
            extra = args.roomfs_args if args.baseline_args is None else args.baseline_args
        t = FuseTarget(kind, base,
                       [binary, "mount", "--data-dir", "{src}", "--room", ROOM_ID]
                       + shlex.split(extra) + ["{mnt}"],
                       [binary, "unmount", "{mnt}"], args.mount_timeout)
        t.backing_root = os.path.join(t.src, "rooms", ROOM_ID)
    elif kind == "bindfs":
        t = FuseTarget("bindfs", base, ["bindfs", "-f", "{src}", "{mnt}"],
                       None, args.mount_timeout)
        t.backing_root = t.src
    elif kind == "rclone":
        # rclone's local backend, with the write cache its docs recommend for POSIX-ish use.
        t = FuseTarget("rclone", base,
                       ["rclone", "mount", "--vfs-cache-mode", "writes", "--vfs-write-back", "0s", "--allow-non-empty",
                        "--cache-dir", "{work}/cache", ":local:{src}", "{mnt}"],
                       None, args.mount_timeout)
        t.backing_root = t.src
    elif kind == "fuse-overlayfs":
        t = OverlayTarget("fuse-overlayfs", base,
                          ["fuse-overlayfs", "-f", "-o",
                           "lowerdir={work}/lower,upperdir={src},workdir={work}/ovl", "{mnt}"],
                          None, args.mount_timeout)
        t.backing_root = t.src
    else:
        raise ValueError(kind)
    return t


# ------------------------------------------------------------- workloads ---

class Sizes:
    def __init__(self, quick: bool, args=None):
        self.seq_bytes = (64 if quick else 1024) * MiB
        self.nfiles = 500 if quick else 5000
        self.small = 4096
        self.appends = 2000
        self.pwrite_file = 64 * MiB
        self.pwrites = 2000
        self.lat_files = 1000
        self.venv_pip = not quick
        self.tar_files = 100 if quick else 1000
        if args is not None:
            self.override(args)

    def override(self, args) -> None:
        """--seq-mib, --files, --appends, --pwrites, --pwrite-mib, where given."""
        if getattr(args, "seq_mib", None):
            self.seq_bytes = args.seq_mib * MiB
        if getattr(args, "files", None):
            self.nfiles = self.lat_files = args.files
        if getattr(args, "appends", None):
            self.appends = args.appends
        if getattr(args, "pwrites", None):
            self.pwrites = args.pwrites
        if getattr(args, "pwrite_mib", None):
            self.pwrite_file = args.pwrite_mib * MiB

    def describe(self) -> str:
        return (f"{self.seq_bytes // MiB} MiB sequential, {self.nfiles} files, {self.appends} appends,"
                f" {self.pwrites} pwrites in {self.pwrite_file // MiB} MiB")


def rotated(xs: list, k: int) -> list:
    """`xs` turned by `k`: round k's order of the targets (see Method)."""
    if not xs:
        return xs
    k %= len(xs)
    return xs[k:] + xs[:k]


def _now() -> int:
    return time.perf_counter_ns()


def _secs(t0: int, t1: int) -> float:
    return max(t1 - t0, 1) / 1e9


def group_seq(d: str, sz: Sizes, rnd: random.Random, settle=None) -> dict:
    res = {}
    path = os.path.join(d, "seq.bin")
    base = bytearray(rnd.randbytes(MiB))
    nchunks = sz.seq_bytes // MiB

    def expect(i: int) -> bytes:
        return i.to_bytes(8, "little") + bytes(base[8:])

    os.sync()
    t0 = _now()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        buf = base
        for i in range(nchunks):
            buf[0:8] = i.to_bytes(8, "little")
            mv = memoryview(buf)
            while mv:
                n = os.write(fd, mv)
                if n <= 0:
                    raise WorkloadError(f"os.write returned {n}")
                mv = mv[n:]
    finally:
        os.close(fd)
    t1 = _now()
    res["seq-write"] = sz.seq_bytes / 1e6 / _secs(t0, t1)
    if settle:
        res["seq-write/stored"] = sz.seq_bytes / 1e6 / (_secs(t0, t1) + settle([path]))
    st = os.stat(path)
    if st.st_size != sz.seq_bytes:
        raise WorkloadError(f"seq-write: size {st.st_size} != {sz.seq_bytes}")
    _verify_seq_samples(path, nchunks, expect, "seq-write")

    os.sync()
    t0 = _now()
    fd = os.open(path, os.O_RDONLY)
    total = 0
    bad = 0
    try:
        while True:
            b = os.read(fd, MiB)
            if not b:
                break
            if len(b) == MiB and total % MiB == 0 and b[:8] != (total // MiB).to_bytes(8, "little"):
                bad += 1
            total += len(b)
    finally:
        os.close(fd)
    t1 = _now()
    if total != sz.seq_bytes:
        return {**res, "seq-read": WorkloadError(f"seq-read: read {total} bytes, expected {sz.seq_bytes}")}
    if bad:
        return {**res, "seq-read": WorkloadError(f"seq-read: {bad} chunks with a wrong header")}
    res["seq-read"] = sz.seq_bytes / 1e6 / _secs(t0, t1)
    os.unlink(path)
    return res


def _verify_seq_samples(path, nchunks, expect, what):
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in sorted({0, nchunks // 2, nchunks - 1}):
            got = os.pread(fd, MiB, i * MiB)
            if got != expect(i):
                raise WorkloadError(f"{what}: chunk {i} reads back wrong")
    finally:
        os.close(fd)


def group_files(d: str, sz: Sizes, rnd: random.Random, settle=None) -> dict:
    res: dict = {}
    data = rnd.randbytes(sz.small)
    names = [f"f{i:05d}" for i in range(sz.nfiles)]
    paths = [os.path.join(d, n) for n in names]
    later = ("list+stat", "small-read", "delete")

    def fail_rest(start: str, err: Exception) -> dict:
        idx = ["create", *later].index(start)
        for w in ["create", *later][idx:]:
            res[w] = err if w == start else WorkloadError(f"skipped: {start} failed")
        return res

    os.sync()
    try:
        t0 = _now()
        for p in paths:
            with open(p, "wb") as f:
                f.write(data)
        t1 = _now()
        if settle:
            res["create/stored"] = sz.nfiles / (_secs(t0, t1) + settle(paths))
    except Exception as e:  # noqa: BLE001
        return fail_rest("create", e)
    res["create"] = sz.nfiles / _secs(t0, t1)

    os.sync()
    try:
        t0 = _now()
        listed = os.listdir(d)
        wrong = 0
        for n in listed:
            if os.stat(os.path.join(d, n)).st_size != sz.small:
                wrong += 1
        t1 = _now()
        if sorted(listed) != names:
            raise WorkloadError(f"list+stat: listed {len(listed)} entries, expected {sz.nfiles} f*")
        if wrong:
            raise WorkloadError(f"list+stat: {wrong} files with st_size != {sz.small}")
        res["list+stat"] = sz.nfiles / _secs(t0, t1)
    except Exception as e:  # noqa: BLE001
        res["list+stat"] = e

    os.sync()
    try:
        t0 = _now()
        wrong = 0
        for p in paths:
            with open(p, "rb") as f:
                if f.read() != data:
                    wrong += 1
        t1 = _now()
        if wrong:
            raise WorkloadError(f"small-read: {wrong} files with wrong content")
        res["small-read"] = sz.nfiles / _secs(t0, t1)
    except Exception as e:  # noqa: BLE001
        res["small-read"] = e

    os.sync()
    try:
        t0 = _now()
        for p in paths:
            os.unlink(p)
        t1 = _now()
        left = os.listdir(d)
        if left:
            raise WorkloadError(f"delete: {len(left)} entries left after unlinking all")
        res["delete"] = sz.nfiles / _secs(t0, t1)
    except Exception as e:  # noqa: BLE001
        res["delete"] = e
    return res


def group_append(d: str, sz: Sizes, rnd: random.Random, settle=None) -> dict:
    p = os.path.join(d, "append.log")
    lines = [f"append line {i:06d} {rnd.getrandbits(32):08x}\n" for i in range(sz.appends)]
    os.sync()
    t0 = _now()
    for line in lines:
        with open(p, "a") as f:
            f.write(line)
    t1 = _now()
    stored = {"append/stored": sz.appends / (_secs(t0, t1) + settle([p]))} if settle else {}
    with open(p) as f:
        got = f.read()
    n = got.count("\n")
    if n != sz.appends:
        raise WorkloadError(f"append: file has {n} lines, expected {sz.appends}")
    if got != "".join(lines):
        raise WorkloadError("append: content differs from what was appended")
    return {"append": sz.appends / _secs(t0, t1), **stored}


def group_pwrite(d: str, sz: Sizes, rnd: random.Random, settle=None) -> dict:
    p = os.path.join(d, "rand.bin")
    blk = 4096
    nblocks = sz.pwrite_file // blk
    fill = rnd.randbytes(MiB)
    with open(p, "wb") as f:  # not timed
        for _ in range(sz.pwrite_file // MiB):
            f.write(fill)
    if settle:
        settle([p])
    base = rnd.randbytes(blk)
    offsets = [rnd.randrange(nblocks) * blk for _ in range(sz.pwrites)]
    blocks = [i.to_bytes(8, "little") + base[8:] for i in range(sz.pwrites)]
    os.sync()
    t0 = _now()
    fd = os.open(p, os.O_RDWR)
    try:
        for off, b in zip(offsets, blocks):
            n = os.pwrite(fd, b, off)
            if n != blk:
                raise WorkloadError(f"random-pwrite: short write {n} at {off}")
    finally:
        os.close(fd)
    t1 = _now()
    stored = {"random-pwrite/stored": sz.pwrites / (_secs(t0, t1) + settle([p]))} if settle else {}
    final = dict(zip(offsets, blocks))  # last write wins
    sample = rnd.sample(sorted(final), min(200, len(final)))
    st = os.stat(p)
    if st.st_size != sz.pwrite_file:
        raise WorkloadError(f"random-pwrite: size changed to {st.st_size}")
    fd = os.open(p, os.O_RDONLY)
    try:
        for off in sample:
            if os.pread(fd, blk, off) != final[off]:
                raise WorkloadError(f"random-pwrite: block at {off} reads back wrong")
        # and one untouched block keeps the fill pattern
        untouched = next((o for o in range(0, sz.pwrite_file, blk) if o not in final), None)
        if untouched is not None and os.pread(fd, blk, untouched) != fill[untouched % MiB:untouched % MiB + blk]:
            raise WorkloadError(f"random-pwrite: untouched block at {untouched} changed")
    finally:
        os.close(fd)
    os.unlink(p)
    return {"random-pwrite": sz.pwrites / _secs(t0, t1), **stored}


def group_latency(d: str, sz: Sizes, rnd: random.Random, backing=None) -> dict:
    data = rnd.randbytes(100)
    paths = [os.path.join(d, f"l{i:05d}") for i in range(sz.lat_files)]
    lat = []
    os.sync()
    for p in paths:
        t0 = _now()
        with open(p, "wb") as f:
            f.write(data)
        t1 = _now()
        lat.append((t1 - t0) / 1e3)
    sizes = {os.stat(p).st_size for p in paths}
    if sizes != {100}:
        raise WorkloadError(f"latency: file sizes {sorted(sizes)[:5]} != 100")
    if backing is not None:  # committed data is where it should be (untimed)
        for p in (paths[0], paths[-1]):
            bp = backing(p)
            try:
                with open(bp, "rb") as f:
                    ok = f.read() == data
            except OSError as e:
                raise WorkloadError(f"latency: {os.path.basename(p)} not in the backing store: {e}")
            if not ok:
                raise WorkloadError(f"latency: {bp} has different content than was written")
    return {"latency": statistics.median(lat)}


def group_tools(d: str, sz: Sizes, rnd: random.Random, settle=None) -> dict:
    """Real programs' patterns of files, each measured on its own (one failing does not fail
    the other): `venv_made` and `tar_x`."""
    res: dict = {}
    for name, run in (("venv", venv_made), ("tar-x", tar_x)):
        try:
            res.update(run(d, sz, rnd, settle))
        except Exception as e:  # noqa: BLE001
            res[name] = e
    return res


def venv_made(d: str, sz: Sizes, rnd: random.Random, settle=None) -> dict:
    """A real program's pattern of files: `python3 -m venv` with pip (from the wheel Python
    bundles, no network): some 1,650 files and directories, temporary files renamed into
    place, bytecode written next to sources just read, symlinks, modes. Reported as entries
    made a second. `sz.venv_pip` False: without pip (a few dozen entries, for quick runs)."""
    venv = os.path.join(d, "venv")
    cmd = [sys.executable, "-m", "venv", *([] if sz.venv_pip else ["--without-pip"]), venv]
    os.sync()
    t0 = _now()
    r = subprocess.run(cmd, capture_output=True, text=True)
    t1 = _now()
    if r.returncode != 0:
        raise WorkloadError(f"venv: {' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-500:]}")
    entries, files = 0, []
    for root, dirs, names in os.walk(venv):
        entries += len(dirs) + len(names)
        files += [p for p in (os.path.join(root, n) for n in names) if not os.path.islink(p)]
    if sz.venv_pip and not os.path.exists(os.path.join(venv, "bin", "pip")):
        raise WorkloadError("venv: no bin/pip made")
    # (uploads waited for: the regular files; directories and symlinks are no objects there)
    stored = {"venv/stored": entries / (_secs(t0, t1) + settle(files))} if settle else {}
    return {"venv": entries / _secs(t0, t1), **stored}


def tar_x(d: str, sz: Sizes, rnd: random.Random, settle=None) -> dict:
    """`tar -x` of an archive of `sz.tar_files` files (1-16 KiB, in 10 directories, with
    modes, owners and times of their own, as a release tarball or a container layer): as root,
    tar sets each file's owner, mode and times through its descriptor after writing it.
    Checked after: every file's size, mode, owner and mtime. Reported as files a second."""
    import io
    import tarfile
    old = 1_000_000_000
    members = []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(sz.tar_files):
            data = rnd.randbytes(rnd.randint(1024, 16384))
            info = tarfile.TarInfo(f"pkg/d{i % 10}/f{i:05d}")
            info.size, info.mode = len(data), (0o755 if i % 4 == 0 else 0o640)
            info.uid, info.gid, info.mtime = 1000 + i % 3, 1000 + i % 2, old + i
            tar.addfile(info, io.BytesIO(data))
            members.append(info)
    archive = os.path.join(tempfile.gettempdir(), f"roomfs-bench-{os.getpid()}.tar")
    with open(archive, "wb") as f:
        f.write(buf.getvalue())
    try:
        out = os.path.join(d, "tar")
        os.mkdir(out)
        os.sync()
        t0 = _now()
        r = subprocess.run(["tar", "-xf", archive, "-C", out], capture_output=True, text=True)
        t1 = _now()
    finally:
        os.unlink(archive)
    if r.returncode != 0:
        raise WorkloadError(f"tar -x exited {r.returncode}: {r.stderr.strip()[-300:]}")
    wrong = []
    root = os.geteuid() == 0  # (tar keeps the archive's owners only as root)
    for m in members:
        st = os.stat(os.path.join(out, m.name))
        got = {"size": st.st_size, "mode": oct(st.st_mode & 0o7777), "mtime": st.st_mtime_ns // 10**9,
               **({"uid": st.st_uid, "gid": st.st_gid} if root else {})}
        want = {"size": m.size, "mode": oct(m.mode), "mtime": m.mtime,
                **({"uid": m.uid, "gid": m.gid} if root else {})}
        if got != want:
            wrong.append(f"{m.name}: " + ", ".join(f"{k} {got[k]} (not {want[k]})" for k in got if got[k] != want[k]))
    if wrong:
        raise WorkloadError(f"tar -x: {len(wrong)} of {len(members)} files differ from the archive, e.g. {wrong[0]}")
    n = len(members)
    paths = [os.path.join(out, m.name) for m in members]
    stored = {"tar-x/stored": n / (_secs(t0, t1) + settle(paths))} if settle else {}
    return {"tar-x": n / _secs(t0, t1), **stored}


GROUP_FUNCS = {"seq": group_seq, "files": group_files, "append": group_append,
               "pwrite": group_pwrite, "latency": group_latency, "tools": group_tools}


class Watchdog:
    """Abort the target's FUSE mount if the body runs longer than `seconds`."""

    def __init__(self, target: Target, seconds: float, what: str):
        self.target, self.seconds, self.what = target, seconds, what
        self.fired = threading.Event()
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True

    def _expire(self):
        self.fired.set()
        log(f"[{self.target.name}] watchdog: {self.what} exceeded {self.seconds:g} s"
            + (", aborting the mount" if self.target.mnt else ""))
        self.target.abort()

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        return False


def run_group(target: Target, group: str, wl_names: list[str], rnd_seed: int,
              sz: Sizes, round_no: int, timeout: float, check_backing: bool = False) -> dict:
    """Run one workload group in a fresh subdirectory; never raises (except Ctrl-C)."""
    bad = target.healthy()
    if bad:
        return {w: WorkloadError(f"{target.name}: {bad}") for w in wl_names}
    d = os.path.join(target.root, f"r{round_no}-{group}")
    with Watchdog(target, timeout, group) as wd:
        try:
            os.mkdir(d)
            fn = GROUP_FUNCS[group]
            if group == "latency" and check_backing and target.backing_path("x"):
                def backing(p: str) -> str | None:
                    return target.backing_path(os.path.relpath(p, target.root))
                res = fn(d, sz, random.Random(rnd_seed), backing)
            elif target.settle is not None:
                res = fn(d, sz, random.Random(rnd_seed), settle=target.settle)
            else:
                res = fn(d, sz, random.Random(rnd_seed))
            shutil.rmtree(d)  # not timed
        except Exception as e:  # noqa: BLE001
            if wd.fired.is_set():
                e = WorkloadError(f"timed out after {timeout:g} s ({type(e).__name__}: {e})")
            res = {w: e for w in wl_names}
    for w in wl_names:
        res.setdefault(w, WorkloadError("no result"))
    return res


# ---------------------------------------------------------------- report ---

def git_commit() -> str:
    try:
        r = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            return "uncommitted"
        c = r.stdout.strip()
        s = subprocess.run(["git", "--no-optional-locks", "-C", REPO, "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        return c + ("+dirty" if s.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "uncommitted"


def fmt_val(v: float, unit: str) -> str:
    if v >= 100:
        s = f"{v:,.0f}"
    elif v >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.2f}"
    return f"{s} {unit}"


def summarize(results: dict, names: list[str], rounds: int) -> dict:
    """results[target][workload] = list (per round) of float | Exception."""
    summary: dict = {}
    for wl, unit, goal in WORKLOADS:
        row: dict = {"unit": unit, "target": goal, "cols": {}}
        nat = results["native"][wl]
        for name in names:
            vals = results[name][wl]
            errs = [(i, v) for i, v in enumerate(vals) if isinstance(v, BaseException)]
            col: dict = {"values": [v if not isinstance(v, BaseException) else None for v in vals],
                         "errors": [f"round {i + 1}: {type(v).__name__}: {v}" for i, v in errs]}
            good = [v for v in vals if not isinstance(v, BaseException)]
            col["median"] = statistics.median(good) if good and not errs else None
            if name != "native":
                ratios = []
                for a, b in zip(nat, vals):
                    if isinstance(a, BaseException) or isinstance(b, BaseException):
                        continue
                    ratios.append(a / b if wl in LOWER_IS_BETTER else b / a)
                col["ratios"] = ratios
                ok = not errs and not any(isinstance(a, BaseException) for a in nat)
                col["ratio"] = statistics.median(ratios) if ratios and ok else None
                col["spread"] = (min(ratios), max(ratios)) if ratios and ok else None
            row["cols"][name] = col
        summary[wl] = row
    return summary


def render(summary: dict, names: list[str], primary: str, header: str) -> str:
    others = [n for n in names if n != "native"]
    cols = ["workload", "native"]
    for n in others:
        cols += [n, f"ratio", "spread"]
        if n == primary:
            cols += ["target", ""]
    rows = []
    for wl, row in summary.items():
        unit, goal = row["unit"], row["target"]
        nat = row["cols"]["native"]
        r = [wl, "FAIL" if nat["errors"] else fmt_val(nat["median"], unit)]
        for n in others:
            c = row["cols"][n]
            r.append("FAIL" if c["errors"] else fmt_val(c["median"], unit))
            if c["ratio"] is None:
                r += ["FAIL", "-"]
            else:
                lo, hi = c["spread"]
                r += [f"{c['ratio']:.2f}", f"{lo:.2f}..{hi:.2f}"]
            if n == primary:
                r.append(f">={goal:g}" if goal is not None else "-")
                if c["ratio"] is None:
                    r.append("FAIL")
                elif goal is not None and c["ratio"] < goal:
                    r.append("below")
                else:
                    r.append("")
        rows.append(r)
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    right = {i for i, c in enumerate(cols) if c not in ("workload", "")}

    def line(cells):
        return "  ".join((c.rjust(w) if i in right else c.ljust(w))
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [header, line(cols), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------- agents ---
#
# The concurrency benchmark (--agents): N agent processes at once, each creating, writing
# (4 KiB) and reading back its own files in its own directory with Python open(), on every
# target in the same round, one N after the other.  An operation is one file: its
# create + write + close, and its open + read + close later (the read checks the bytes).
# Python's start-up is not timed: every worker prepares, says "ready", and waits for "go"
# on its stdin; the time runs from the go to the last worker's report.  The daemon's CPU
# time is utime + stime of the mount process (all its threads) from /proc/PID/stat, taken
# at the go and after the last report (the asynchronous releases still under way then are
# a few requests out of thousands).

AGENT_WORKER = r"""
import json, os, random, sys, time
d, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = random.Random(seed).randbytes(4096)
paths = [os.path.join(d, f"f{i:05d}") for i in range(n)]
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter_ns()
for p in paths:
    with open(p, "wb") as f:
        f.write(data)
bad = 0
for p in paths:
    with open(p, "rb") as f:
        if f.read() != data:
            bad += 1
t1 = time.perf_counter_ns()
print(json.dumps({"ns": t1 - t0, "bad": bad}), flush=True)
"""

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_secs(pid: int) -> float | None:
    """utime + stime of process `pid` (all its threads, those ended included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after the ")": state is field 3, utime 14 and stime 15 (1-based, man 5 proc)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_agents(target: Target, d: str, agents: int, files: int, seed: int,
               timeout: float, check_backing: bool, keep_files: bool) -> dict:
    """One run of `agents` workers in `d` on `target`: {"ops_s", "cpu_us"} or an exception
    under "error"; never raises (except Ctrl-C).  `keep_files`: leave the files for the end
    of the disk's rounds (see below) instead of removing them after the run."""
    bad = target.healthy()
    if bad:
        return {"error": WorkloadError(f"{target.name}: {bad}")}
    procs: list[subprocess.Popen] = []
    with Watchdog(target, timeout, f"{agents} agents") as wd:
        try:
            os.mkdir(d)
            dirs = [os.path.join(d, f"agent{i}") for i in range(agents)]
            for a in dirs:
                os.mkdir(a)
            os.sync()
            for i, a in enumerate(dirs):
                procs.append(subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", AGENT_WORKER, a, str(files), str(seed + i)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            for p in procs:
                if p.stdout.readline().strip() != "ready":
                    raise WorkloadError(f"agent pid {p.pid} did not start")
            pid = target.proc.pid if target.proc is not None else None
            cpu0 = proc_cpu_secs(pid) if pid else None
            t0 = _now()
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            reports = [p.stdout.readline() for p in procs]
            t1 = _now()
            cpu1 = proc_cpu_secs(pid) if pid else None
            for p, line in zip(procs, reports):
                if p.wait() != 0 or not line:
                    raise WorkloadError(f"agent pid {p.pid} failed (status {p.returncode})")
                if json.loads(line)["bad"]:
                    raise WorkloadError(f"agent pid {p.pid} read back wrong content")
            ops = agents * files
            res = {"ops_s": ops / _secs(t0, t1)}
            if cpu0 is not None and cpu1 is not None:
                res["cpu_us"] = (cpu1 - cpu0) * 1e6 / ops
            if check_backing and target.backing_path("x"):
                for i, a in enumerate(dirs):
                    bp = target.backing_path(os.path.relpath(os.path.join(a, "f00000"), target.root))
                    with open(bp, "rb") as f:
                        if f.read() != random.Random(seed + i).randbytes(4096):
                            raise WorkloadError(f"{bp} has different content than was written")
            # On ext4 without a journal each new inode is found past every inode of its group
            # freed in the last minute (recently_deleted), so removing one run's files would
            # slow down the next target's creates, whichever it is: there they stay until the
            # disk's rounds are over. Elsewhere they go now (a 6 GiB image has too few inodes
            # for every round's files).
            if not keep_files:
                shutil.rmtree(d)  # not timed
            return res
        except Exception as e:  # noqa: BLE001
            if wd.fired.is_set():
                e = WorkloadError(f"timed out after {timeout:g} s ({type(e).__name__}: {e})")
            return {"error": e}
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def disk_description(path: str) -> str:
    """The filesystem under `path`: type, whether ext4 has a journal, mount options."""
    r = subprocess.run(["findmnt", "-no", "SOURCE,FSTYPE,OPTIONS", "-T", path],
                       capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.split():
        return "unknown filesystem"
    source, fstype, opts = (r.stdout.split() + ["", "", ""])[:3]
    desc = fstype
    if fstype.startswith("ext"):
        try:  # "<none>" when it has no journal
            with open(f"/sys/fs/ext4/{os.path.basename(os.path.realpath(source))}/journal_task") as f:
                desc += " without journal" if f.read().strip() == "<none>" else " with journal"
        except OSError:
            pass
    keep = [o for o in opts.split(",") if o in ("discard", "nobarrier", "data=writeback",
                                                 "data=journal", "sync", "noatime")]
    return desc + (f" ({','.join(keep)})" if keep else "")


class LoopImage:
    """A journaled ext4 image mounted through a loop device; removed on close, always."""

    def __init__(self, parent: str, size: str = "6G"):
        self.dir = tempfile.mkdtemp(prefix="roomfs-bench-loop-", dir=parent)
        self.image = os.path.join(self.dir, "image")
        self.mnt = os.path.join(self.dir, "mnt")
        self.mounted = False
        os.mkdir(self.mnt)
        for cmd in (["truncate", "-s", size, self.image],
                    ["mkfs.ext4", "-q", "-F", "-O", "has_journal", self.image],
                    ["mount", "-o", "loop", self.image, self.mnt]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                self.close()
                raise RuntimeError(f"{shlex.join(cmd)} failed: {r.stderr.strip()}")
        self.mounted = True

    def close(self) -> None:
        if self.mounted or is_mounted(self.mnt):
            if not run_quiet(["umount", self.mnt], timeout=60):
                run_quiet(["umount", "-l", self.mnt])
        self.mounted = is_mounted(self.mnt)
        if self.mounted:
            log(f"WARNING: {self.mnt} is still mounted; leaving {self.dir}")
            return
        shutil.rmtree(self.dir, ignore_errors=True)


def agents_on(disk_root: str, args, label: str) -> tuple[dict, list[str], str]:
    """Runs the agents benchmark with its scratch dir under `disk_root`; returns the results
    {target: {N: [per-round dict]}}, the target names and the disk's description."""
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="roomfs-bench-", dir=disk_root))
    desc = disk_description(workdir)
    log(f"[{label}] scratch dir {workdir}: {desc}")
    targets: list[Target] = [NativeTarget("native", os.path.join(workdir, "native")),
                             make_target("roomfs", os.path.join(workdir, "roomfs"), args)]
    if args.baseline:
        targets.append(make_target("baseline", os.path.join(workdir, "baseline"), args))
    results = {t.name: {n: [] for n in args.agents} for t in targets}
    mounted: list[Target] = []
    try:
        for tg in targets:
            mounted.append(tg)
            tg.setup()
        for rnd in range(args.rounds):
            for n in args.agents:
                for tg in rotated(targets, rnd):
                    load = os.getloadavg()[0]
                    res = run_agents(tg, os.path.join(tg.root, f"r{rnd}-a{n}"), n,
                                     args.agent_files, rnd * 1000 + n, args.timeout,
                                     check_backing=tg.name != "native",
                                     keep_files="without journal" in desc
                                     and not args.agents_delete)
                    res["load"] = load
                    results[tg.name][n].append(res)
                    if "error" in res:
                        st = f"FAIL: {res['error']}"
                    else:
                        st = f"{res['ops_s']:8,.0f} ops/s"
                        if "cpu_us" in res:
                            st += f"  daemon {res['cpu_us']:6.1f} us/op"
                    log(f"  [{label}] round {rnd + 1}/{args.rounds} agents {n:3d} "
                        f"{tg.name:9s} {st}  (load {load:.2f})")
    finally:
        failed_logs = {}
        for tg in reversed(mounted):
            if tg.ready and tg.proc is not None and tg.proc.poll() is not None:
                failed_logs[tg.name] = tg.log_tail()
            try:
                tg.teardown()
            except Exception as e:  # noqa: BLE001
                log(f"[{tg.name}] teardown error: {e}")
        left = mounts_under(workdir)
        if left:
            log(f"ERROR: mounts left behind: {left}; not removing {workdir}")
        elif args.keep:
            log(f"kept scratch dir {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        for n, tail in failed_logs.items():
            log(f"[{n}] daemon output (tail):\n{tail}")
    return results, [t.name for t in targets], desc


def render_agents(results: dict, names: list[str], agents: list[int]) -> tuple[str, list[str], dict]:
    """The table of one disk, the failures, and the summary as data."""
    def med(xs):
        return statistics.median(xs) if xs else None

    fails: list[str] = []
    summary: dict = {}
    rows = []
    others = [n for n in names if n != "native"]
    cols = ["agents", "native ops/s"]
    for o in others:
        cols += [f"{o} ops/s", "ratio", "spread", f"x vs 1", "daemon us/op", "spread"]
    cols += ["load"]
    for n in agents:
        nat = results["native"][n]
        row = [str(n)]
        nat_ok = [r.get("ops_s") for r in nat]
        row.append(f"{med([v for v in nat_ok if v]):,.0f}" if any(nat_ok) else "FAIL")
        summary[n] = {"native": med([v for v in nat_ok if v]), "load": med([r["load"] for r in nat])}
        for o in others:
            rs = results[o][n]
            for i, r in enumerate(rs):
                if "error" in r:
                    fails.append(f"FAIL agents={n} [{o}] round {i + 1}: {r['error']}")
            ratios = [r["ops_s"] / a["ops_s"] for r, a in zip(rs, nat)
                      if "error" not in r and "error" not in a]
            one = results[o].get(1)
            scale = []
            if one:
                scale = [r["ops_s"] / b["ops_s"] for r, b in zip(rs, one)
                         if "error" not in r and "error" not in b]
            cpu = [r["cpu_us"] for r in rs if "cpu_us" in r]
            ops = [r["ops_s"] for r in rs if "ops_s" in r]
            s = {"ops_s": med(ops), "ratio": med(ratios), "x_vs_1": med(scale),
                 "cpu_us": med(cpu), "ratios": ratios, "cpus": cpu}
            summary[n][o] = s
            row.append(f"{s['ops_s']:,.0f}" if ops else "FAIL")
            row.append(f"{s['ratio']:.2f}" if ratios else "-")
            row.append(f"{min(ratios):.2f}..{max(ratios):.2f}" if ratios else "-")
            row.append(f"{s['x_vs_1']:.2f}" if scale else "-")
            row.append(f"{s['cpu_us']:.0f}" if cpu else "-")
            row.append(f"{min(cpu):.0f}..{max(cpu):.0f}" if cpu else "-")
        loads = [r["load"] for t in names for r in results[t][n]]
        row.append(f"{min(loads):.1f}..{max(loads):.1f}")
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]

    def line(cells):
        return "  ".join((c.rjust(w) if i else c.ljust(w))
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out), fails, summary


def agents_main(args) -> int:
    started = time.monotonic()
    binary = args.roomfs_bin or os.path.join(REPO, "target", "release", "roomfs")
    if not os.access(binary, os.X_OK):
        log(f"error: roomfs binary {binary} not found (run scripts/bench to build it)")
        return 2
    parent = args.workdir or "/var/tmp"
    os.makedirs(parent, exist_ok=True)
    load0 = os.getloadavg()
    tables, fails, doc = [], [], {}
    interrupted = None
    loop: LoopImage | None = None
    try:
        for disk in args.disks:
            if disk == "loop":
                log("creating a journaled ext4 loop image (6 GiB, sparse)")
                loop = LoopImage(parent)
                root = loop.mnt
            else:
                root = parent
            try:
                results, names, desc = agents_on(root, args, disk)
            finally:
                if loop is not None:
                    loop.close()
                    loop = None
            table, f, summary = render_agents(results, names, args.agents)
            what = "the data dir's disk" if disk == "data" else "a journaled ext4 loop image"
            tables.append(f"## {what}: {desc}\n{table}")
            fails += [f"[{disk}] {x}" for x in f]
            doc[disk] = {"filesystem": desc, "results": {
                t: {str(n): [{k: (str(v) if k == "error" else v) for k, v in r.items()}
                             for r in rs] for n, rs in per.items()}
                for t, per in results.items()}, "summary": {str(k): v for k, v in summary.items()}}
    except (Interrupted, Exception) as e:  # noqa: BLE001
        interrupted = stopped_by(e)
    finally:
        ignore_signals()
        if loop is not None:
            loop.close()
    if interrupted is not None:
        return 130 if "SIG" in interrupted else 2
    load1 = os.getloadavg()
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    print(f"# {now} | kernel {os.uname().release} | {os.cpu_count()} CPUs | commit {git_commit()}"
          f" | {args.rounds} rounds, {args.agent_files} files of 4 KiB per agent"
          f"{', deleted after each run' if args.agents_delete else ''}"
          f" | {time.monotonic() - started:.0f} s\n"
          f"# load average (1/5/15 min) before {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f},"
          f" after {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}\n"
          f"# an op is one file: create + write + close, and open + read + close; medians of "
          f"the rounds;\n#   ratio = roomfs/native per round; x vs 1 = ops/s against 1 agent's "
          f"in the same round;\n#   daemon us/op = the mount process's CPU (user + system) per "
          f"op; load = 1-min load average at each run's start")
    for t in tables:
        print(t)
    for f in fails:
        print(f)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": now, "kernel": os.uname().release, "cpus": os.cpu_count(),
                       "commit": git_commit(), "rounds": args.rounds, "agents": args.agents,
                       "files": args.agent_files, "load": [load0, load1], "disks": doc,
                       "failures": fails}, f, indent=2)
    return 1 if fails else 0


# ------------------------------------------------------------------ main ---

def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark roomfs against the native filesystem (ratios, higher is better).")
    ap.add_argument("--store", choices=["local", "s3"], default="local",
                    help="roomfs's store: local (default: against native, bindfs, fuse-overlayfs, "
                    "rclone) or s3 (a SeaweedFS of its own; against native, JuiceFS, rclone, s3fs "
                    "and a raw S3 client, see doc/PERFORMANCE.md)")
    ap.add_argument("--rounds", type=int, help="rounds, interleaved native/roomfs (default 5; 3 with --store s3)")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes for a smoke run (64 MiB, 500 files; --store s3: 32 MiB, 100 files)")
    g = ap.add_argument_group("sizes (override the defaults, with or without --quick)")
    g.add_argument("--seq-mib", type=int, metavar="N", help="sequential write/read: file size in MiB")
    g.add_argument("--files", type=int, metavar="N", help="small files created, listed, read, deleted")
    g.add_argument("--appends", type=int, metavar="N", help="appends (open 'a', write a line, close)")
    g.add_argument("--pwrites", type=int, metavar="N", help="random 4 KiB pwrites")
    g.add_argument("--pwrite-mib", type=int, metavar="N", help="size in MiB of the file pwrites go into")
    g = ap.add_argument_group("--store s3")
    g.add_argument("--s3-targets", metavar="LIST",
                   help="comma-separated subset of roomfs,juicefs,rclone,s3fs,raw to measure besides "
                   "native (default: all); one that is asked for and missing or failing is "
                   "reported ABSENT and the exit status is 1")
    g.add_argument("--s3-latency-ms", type=float, default=0, metavar="MS",
                   help="with --agents: every request reaches SeaweedFS through a proxy that holds "
                   "it MS milliseconds, as a store across a network would (default 0: none)")
    ap.add_argument("--peers", action="store_true", help="also measure bindfs, fuse-overlayfs and rclone if installed")
    ap.add_argument("--install-peers", action="store_true",
                    help="apt-get install -y bindfs fuse-overlayfs rclone fuse3 first (implies --peers); "
                    "with --store s3: scripts/setup --bench-peers (JuiceFS, rclone, s3fs)")
    ap.add_argument("--workdir", help="parent of the scratch dir (default /var/tmp); a fresh "
                    "subdirectory is created there and removed at the end")
    ap.add_argument("--json", metavar="FILE", help="also write results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (and daemon logs)")
    S = argparse.SUPPRESS
    ap.add_argument("--target", default="roomfs", choices=["roomfs", "bindfs", "fuse-overlayfs", "rclone"], help=S)
    ap.add_argument("--fs-cmd", help=S)
    ap.add_argument("--fs-name", default="custom", help=S)
    ap.add_argument("--fs-unmount-cmd", help=S)
    ap.add_argument("--roomfs-bin", help=S)
    ap.add_argument("--baseline-bin", help=S)
    ap.add_argument("--baseline-args", help=S)
    ap.add_argument("--agents", metavar="N,N,...",
                    help="run the concurrency benchmark instead: N agent processes at once, each "
                    "creating, writing and reading back its own 4 KiB files (e.g. 1,4,8,16)")
    ap.add_argument("--agent-files", type=int, default=2000, metavar="N",
                    help="files per agent in --agents (default 2000)")
    ap.add_argument("--agents-delete", action="store_true",
                    help="in --agents, delete each run's files right after it (untimed), as agents "
                    "that clean up do: on ext4 without a journal the next runs' creates then meet "
                    "the inodes just freed (see doc/PERFORMANCE.md, Levers)")
    ap.add_argument("--disks", default="data,loop",
                    help="where --agents runs: 'data' (the workdir's disk), 'loop' (a journaled "
                    "ext4 image created and removed by the script), or both (default data,loop)")
    ap.add_argument("--roomfs-args", default="",
                    help="extra `roomfs mount` options, e.g. '--poll-window-us 0' (for A/B runs)")
    ap.add_argument("--timeout", type=float, default=300, help=S)
    ap.add_argument("--mount-timeout", type=float, default=10, help=S)
    a = ap.parse_args(argv)
    if a.rounds is None:
        a.rounds = 3 if a.store == "s3" else 5
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    for opt in ("seq_mib", "files", "appends", "pwrites", "pwrite_mib"):
        if getattr(a, opt) is not None and getattr(a, opt) < 1:
            ap.error(f"--{opt.replace('_', '-')} must be >= 1")
    if a.s3_targets is not None and a.store != "s3":
        ap.error("--s3-targets needs --store s3")
    if a.s3_latency_ms and (a.store != "s3" or a.agents is None):
        ap.error("--s3-latency-ms needs --store s3 and --agents")
    if a.s3_latency_ms < 0:
        ap.error("--s3-latency-ms must be >= 0")
    if a.install_peers:
        a.peers = True
    if a.agents is not None:
        try:
            a.agents = [int(n) for n in a.agents.split(",") if n.strip()]
        except ValueError:
            ap.error(f"--agents wants numbers separated by commas, got {a.agents!r}")
        if not a.agents or min(a.agents) < 1:
            ap.error("--agents wants at least one number, each >= 1")
        a.disks = [d.strip() for d in a.disks.split(",") if d.strip()]
        if not a.disks or any(d not in ("data", "loop") for d in a.disks):
            ap.error("--disks takes data, loop or data,loop")
        if a.agent_files < 1:
            ap.error("--agent-files must be >= 1")
    if a.agents_delete and a.agents is None:
        ap.error("--agents-delete needs --agents")
    if a.baseline_bin and not os.access(a.baseline_bin, os.X_OK):
        ap.error(f"--baseline-bin {a.baseline_bin}: not an executable")
    a.baseline = a.baseline_bin is not None or a.baseline_args is not None
    return a


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        log("note: not root; FUSE mounts may need fusermount3 and user_allow_other")

    def on_signal(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    if args.agents is not None and args.store == "s3":
        from bench_lib import s3bench
        return s3bench.agents_main(args, sys.modules[__name__])
    if args.agents is not None:
        return agents_main(args)
    if args.store == "s3":
        from bench_lib import s3bench
        return s3bench.main(args, sys.modules[__name__])

    if args.install_peers:
        log("installing peers: apt-get install -y bindfs fuse-overlayfs rclone fuse3")
        subprocess.run(["apt-get", "install", "-y", "bindfs", "fuse-overlayfs", "rclone", "fuse3"], check=False,
                       stdout=sys.stderr)

    parent = args.workdir or "/var/tmp"
    os.makedirs(parent, exist_ok=True)
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="roomfs-bench-", dir=parent))
    log(f"scratch dir: {workdir}")

    # targets: native first, then the primary, then peers
    if args.fs_cmd:
        primary = args.fs_name
        t = FuseTarget(primary, os.path.join(workdir, primary), shlex.split(args.fs_cmd),
                       shlex.split(args.fs_unmount_cmd) if args.fs_unmount_cmd else None,
                       args.mount_timeout)
    else:
        primary = args.target
        t = make_target(primary, os.path.join(workdir, primary), args)
        if primary == "roomfs" and not os.access(t.cmd_template[0], os.X_OK):
            log(f"error: roomfs binary {t.cmd_template[0]} not found (run scripts/bench to build it)")
            shutil.rmtree(workdir, ignore_errors=True)
            return 2
    targets: list[Target] = [NativeTarget("native", os.path.join(workdir, "native")), t]
    notes = []
    if args.peers:
        for peer, exe in (("bindfs", "bindfs"), ("fuse-overlayfs", "fuse-overlayfs"), ("rclone", "rclone")):
            if peer == primary:
                continue
            if shutil.which(exe) is None:
                notes.append(f"peer {peer} not installed (use --install-peers)")
                continue
            pt = make_target(peer, os.path.join(workdir, peer), args)
            targets.append(pt)
    if args.baseline:
        targets.append(make_target("baseline", os.path.join(workdir, "baseline"), args))
    names = [t.name for t in targets]
    sz = Sizes(args.quick, args)
    results = {t.name: {w: [] for w, _, _ in WORKLOADS} for t in targets}
    rc = 0
    started = time.monotonic()
    mounted: list[Target] = []
    interrupted = None
    try:
        for tg in targets:
            mounted.append(tg)  # registered first: torn down even if setup is interrupted
            try:
                tg.setup()
            except Exception as e:  # noqa: BLE001
                if tg.name == primary:
                    raise
                tg.setup_error = str(e)
                log(f"[{tg.name}] mount failed: {e}")
        for rnd_no in range(args.rounds):
            log(f"round {rnd_no + 1}/{args.rounds}")
            for gi, (group, wls) in enumerate(GROUPS):
                seed = rnd_no * 1000 + gi
                for tg in rotated(targets, rnd_no):
                    t0 = time.monotonic()
                    if tg.setup_error:
                        res = {w: RuntimeError(f"mount failed: {tg.setup_error}") for w in wls}
                    else:
                        res = run_group(tg, group, wls, seed, sz, rnd_no, args.timeout,
                                        check_backing=tg.name == primary)
                    for w in wls:
                        results[tg.name][w].append(res[w])
                    st = " ".join(("FAIL" if isinstance(res[w], BaseException) else f"{res[w]:.0f}")
                                  for w in wls)
                    log(f"  {group:8s} {tg.name:15s} {st}  ({time.monotonic() - t0:.1f}s)")
    except (Interrupted, Exception) as e:  # noqa: BLE001
        interrupted = stopped_by(e)
    finally:
        ignore_signals()
        failed_logs = {}
        for tg in reversed(mounted):
            if tg.ready and tg.proc is not None and tg.proc.poll() is not None:
                failed_logs[tg.name] = tg.log_tail()  # daemon died during the run
            try:
                tg.teardown()
            except Exception as e:  # noqa: BLE001
                log(f"[{tg.name}] teardown error: {e}")
        left = mounts_under(workdir)
        if left:
            log(f"ERROR: mounts left behind: {left}; not removing {workdir}")
            rc = 3
        elif args.keep:
            log(f"kept scratch dir {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        for n, tail in failed_logs.items():
            log(f"[{n}] daemon output (tail):\n{tail}")

    if interrupted is not None:
        return rc or (130 if "SIG" in interrupted else 2)

    summary = summarize(results, names, args.rounds)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    mode = f"{'quick' if args.quick else 'full'} ({sz.describe()})"
    header = (f"# {now} | kernel {os.uname().release} | {os.cpu_count()} CPUs | commit {git_commit()}"
              f" | {args.rounds} rounds, {mode} | {time.monotonic() - started:.0f} s\n"
              f"# ratio = {primary}/native per round (median; spread = min..max over rounds); "
              f"higher is better everywhere:\n"
              f"#   latency shows median us per create+write+close, its ratio is native/{primary}")
    print(render(summary, names, primary, header))
    for n in notes:
        print(f"# note: {n}")
    fails = []
    for wl, row in summary.items():
        for n, c in row["cols"].items():
            by_msg: dict[str, list[str]] = {}
            for e in c["errors"]:
                rno, msg = e.split(": ", 1)
                by_msg.setdefault(msg, []).append(rno.split()[1])
            for msg, rnos in by_msg.items():
                fails.append(f"FAIL {wl} [{n}] round{'s' if len(rnos) > 1 else ''} {','.join(rnos)}: {msg}")
    for f in fails:
        print(f)
    if args.json:
        doc = {"date": now, "kernel": os.uname().release, "cpus": os.cpu_count(),
               "commit": git_commit(), "rounds": args.rounds, "quick": args.quick,
               "primary": primary, "targets": names, "workloads": summary, "failures": fails}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    if fails:
        rc = rc or 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
