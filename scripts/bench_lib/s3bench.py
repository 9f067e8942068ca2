"""`scripts/bench --store s3`: roomfs on S3 against native ext4, the S3 FUSE peers and a raw client.

One SeaweedFS (`weed mini`, see seaweed.py) of the run's own, one bucket, one prefix per target:
  roomfs   roomfs mount --store s3://BUCKET/roomfs --room r1 (credentials in its environment)
  juicefs  JuiceFS, sqlite metadata in the scratch dir, volume "juicefs" (its objects' prefix)
  rclone   rclone mount BUCKET/rclone --vfs-cache-mode writes --vfs-write-back 0s --vfs-links
  s3fs     s3fs BUCKET:/s3fs -o use_path_request_style
  raw      no mount: a file uploaded and downloaded by boto3 (multipart, its defaults) and by
           rclone copyto/cat, for sequential throughput the store itself allows
Every workload of bench.py but latency runs on native ext4 (the baseline) and on each mount,
interleaved as in bench.py (each group on every target in turn, before the next group). After
the sequential group come, once per round, the raw clients and a cold read on each mount (an
object another client stored, read through the mount). Ratios are target/native per round,
medians over rounds; roomfs's goals are quotients roomfs/peer taken per round too.

rclone returns from close() before its upload is done (the others upload first). Its write
workloads are measured twice: when the last close() returned, and when its remote control shows
no upload pending (RcloneSettle, checked against S3). Its uploads are drained (untimed) before
its next timed section and after each group, so they never run while another target is measured.

A target asked for that is not installed, fails to mount, or mounts but stores nothing in
SeaweedFS (a probe file is written through the mount and looked for with boto3) is reported
ABSENT: in the table, on stderr, and by the exit status (1); the others are still measured.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import math
import os
import random
import secrets
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from . import seaweed
from .seaweed import BUCKET, SeaweedFs, venv_bin

MiB = 1 << 20
ROOM = "r1"
PEERS = ["juicefs", "rclone", "s3fs"]
TARGETS = ["roomfs", *PEERS, "raw"]
LABEL = {"native": "native", "roomfs": "roomfs", "juicefs": "JuiceFS", "rclone": "rclone",
         "s3fs": "s3fs", "raw": "raw client"}

# (workload, unit); descriptions depend on the sizes
WORKLOADS = [
    ("seq-write", "MB/s"),
    ("seq-read", "MB/s"),
    ("create", "files/s"),
    ("list+stat", "files/s"),
    ("small-read", "files/s"),
    ("delete", "files/s"),
    ("append", "ops/s"),
    ("random-pwrite", "ops/s"),
    ("venv", "files/s"),
    ("tar-x", "files/s"),
]
GROUPS = [
    ("seq", ["seq-write", "seq-read"]),
    ("files", ["create", "list+stat", "small-read", "delete"]),
    ("append", ["append"]),
    ("pwrite", ["random-pwrite"]),
    ("tools", ["venv", "tar-x"]),
]
# rclone's figures when its uploads are done (bench.py's settle() hook)
STORED = ["seq-write", "create", "append", "random-pwrite", "venv", "tar-x"]
# issue 17: match or beat rclone on these; 2x ahead of JuiceFS and s3fs on every workload
VS_RCLONE = {"seq-write", "seq-read", "list+stat", "small-read", "delete"}
GOAL_VS_JUICEFS_S3FS = 2.0
# workloads beside the (no goal)
NO_GOAL = {"venv", "tar-x"}
GOAL_VS_RAW = 0.8


def describe(wl: str, sz) -> str:
    mib = sz.seq_bytes // MiB
    return {
        "seq-write": f"sequential write, {mib} MiB in 1 MiB calls",
        "seq-read": f"sequential read, {mib} MiB",
        "create": f"create {sz.small // 1024} KiB files ({sz.nfiles})",
        "list+stat": "listdir + stat",
        "small-read": f"read {sz.small // 1024} KiB files",
        "delete": "delete",
        "append": f"append (open 'a', write a line, close; {sz.appends})",
        "random-pwrite": f"random 4 KiB pwrite in {sz.pwrite_file // MiB} MiB ({sz.pwrites}, one open)",
        "venv": f"python3 -m venv{'' if sz.venv_pip else ' --without-pip'} (entries made)",
        "tar-x": f"tar -x of {sz.tar_files} files with modes, owners, times (files made)",
    }[wl]


def s3_sizes(B, args):
    """Smaller than the local store's: the peers create 30-300 files a second."""
    sz = B.Sizes(args.quick)
    if args.quick:
        sz.seq_bytes, sz.nfiles, sz.appends, sz.pwrite_file, sz.pwrites = 32 * MiB, 100, 50, 16 * MiB, 50
    else:
        sz.seq_bytes, sz.nfiles, sz.appends, sz.pwrite_file, sz.pwrites = 256 * MiB, 500, 200, 64 * MiB, 200
    sz.override(args)
    return sz


class Absent(Exception):
    """A target that cannot be measured; the run goes on without it, loudly."""


# ----------------------------------------------------------- S3 helpers ---

class S3Tool:
    """bench_lib/s3client.py as a co-process under the venv's Python (boto3 lives there, not in
    ours): one request a line, so a call costs a round trip, not a Python start-up."""

    def __init__(self, sw: SeaweedFs):
        self.sw = sw
        self.python = venv_bin("python")
        self.script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "s3client.py")
        self.proc: subprocess.Popen | None = None
        self.errfile = None

    def available(self) -> str | None:
        if not os.access(self.python, os.X_OK):
            return f"{self.python} is missing (scripts/setup installs boto3 there)"
        return None

    def start(self, errlog: str) -> None:
        env = {**os.environ, **self.sw.env(), "S3_BUCKET": BUCKET}
        self.errfile = errlog
        with open(errlog, "ab") as ef:
            self.proc = subprocess.Popen([self.python, self.script], env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=ef, start_new_session=True,
                                         preexec_fn=seaweed.die_with_parent)

    def run(self, *a, timeout: float = 120):
        p = self.proc
        if p is None or p.poll() is not None:
            raise RuntimeError(f"the S3 client co-process is not running; its stderr:\n{self._err()}")
        p.stdin.write((json.dumps(a) + "\n").encode())
        p.stdin.flush()
        r, _, _ = select.select([p.stdout], [], [], timeout)
        if not r:
            self.stop()
            raise RuntimeError(f"S3 client: {a[0]} got no answer within {timeout:g} s (client stopped)")
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"the S3 client co-process exited; its stderr:\n{self._err()}")
        out = json.loads(line)
        if "err" in out:
            raise RuntimeError(f"S3 {' '.join(map(str, a))}: {out['err']}")
        return out["ok"]

    def _err(self) -> str:
        try:
            with open(self.errfile, "rb") as f:
                return f.read().decode(errors="replace")[-2000:]
        except (OSError, TypeError):
            return "(none)"

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is not None:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()


def rclone_env(sw: SeaweedFs) -> dict:
    """An rclone remote `sw:` on our SeaweedFS, given by environment variables only."""
    return {**os.environ,
            "RCLONE_CONFIG_SW_TYPE": "s3", "RCLONE_CONFIG_SW_PROVIDER": "SeaweedFS",
            "RCLONE_CONFIG_SW_ENDPOINT": sw.endpoint,
            "RCLONE_CONFIG_SW_ACCESS_KEY_ID": seaweed.ACCESS_KEY,
            "RCLONE_CONFIG_SW_SECRET_ACCESS_KEY": seaweed.SECRET_KEY,
            "RCLONE_CONFIG_SW_REGION": seaweed.REGION}


def tool_version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
        line = (r.stdout or r.stderr).strip().splitlines()
        return line[0].strip() if line else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


# -------------------------------------------------------------- targets ---

def peer_bin(name: str) -> str:
    """$ROOMFS_BENCH_<NAME> if set (another build, or a test's stand-in), else where
    `scripts/setup --bench-peers` installs it: the venv (JuiceFS, rclone) or PATH (s3fs)."""
    env = os.environ.get(f"ROOMFS_BENCH_{name.upper()}")
    if env:
        return env
    if name == "s3fs":
        return shutil.which("s3fs") or "/usr/bin/s3fs"
    return venv_bin(name)


def make_targets(B, args, sw: SeaweedFs, tool: S3Tool, workdir: str, wanted: list[str]):
    """The FUSE targets asked for: (list of B.Target, {name: absent reason}, {name: version})."""
    targets, absent, versions = [], {}, {}
    mt = max(args.mount_timeout, 30)

    def base(name):
        return os.path.join(workdir, name)

    if "roomfs" in wanted:
        binary = args.roomfs_bin or os.path.join(B.REPO, "target", "release", "roomfs")
        why = None
        if not os.access(binary, os.X_OK):
            why = f"roomfs binary {binary} not found (scripts/bench builds it; or --roomfs-bin)"
        else:
            h = subprocess.run([binary, "mount", "--help"], capture_output=True, text=True,
                               stdin=subprocess.DEVNULL, timeout=20)
            if "--store" not in h.stdout + h.stderr:
                why = (f"this roomfs build ({binary}) has no S3 store: `roomfs mount --help` "
                       f"lists no --store option")
        if why:
            absent["roomfs"] = why
        else:
            t = B.FuseTarget("roomfs", base("roomfs"),
                             [binary, "mount", "--data-dir", "{src}", "--store", f"s3://{BUCKET}/roomfs",
                              "--room", ROOM]
                             + shlex.split(args.roomfs_args) + ["{mnt}"],
                             [binary, "unmount", "{mnt}"], mt)
            t.env = {**os.environ, **sw.env()}
            t.probe_key = f"roomfs/rooms/{ROOM}/"
            targets.append(t)
            versions["roomfs"] = f"commit {B.git_commit()}"

    if "juicefs" in wanted:
        jfs = peer_bin("juicefs")
        if not os.access(jfs, os.X_OK):
            absent["juicefs"] = f"{jfs} not installed (scripts/setup --bench-peers)"
        else:
            t = B.FuseTarget("juicefs", base("juicefs"),
                             # foreground (no -d): its pid is ours to stop; no usage report sent
                             [jfs, "mount", "--no-usage-report", "--backup-meta", "0",
                              "--cache-dir", "{work}/cache",
                              "sqlite3://{work}/meta.db", "{mnt}"],
                             [jfs, "umount", "{mnt}"], mt)
            t.env = {**os.environ, "ACCESS_KEY": seaweed.ACCESS_KEY, "SECRET_KEY": seaweed.SECRET_KEY}
            t.probe_key = None  # objects are chunks under juicefs/chunks/, counted instead
            t.pre_mount = lambda t=t: juicefs_format(t, jfs, sw)
            targets.append(t)
            versions["juicefs"] = tool_version([jfs, "--version"])

    if "rclone" in wanted:
        rc = peer_bin("rclone")
        if not os.access(rc, os.X_OK):
            absent["rclone"] = f"{rc} not installed (scripts/setup --bench-peers)"
        else:
            rc_port = seaweed.free_port()
            t = B.FuseTarget("rclone", base("rclone"),
                             [rc, "mount", f"sw:{BUCKET}/rclone", "{mnt}", "--config", "{work}/rclone.conf",
                              "--vfs-cache-mode", "writes", "--vfs-write-back", "0s",
                              "--vfs-links",  # symlinks, as .rclonelink objects (venv makes some)
                              "--cache-dir", "{work}/cache", "--rc", "--rc-addr", f"127.0.0.1:{rc_port}"],
                             None, mt)
            # its remote control needs a password: without one, anyone on the machine could
            # have it copy files as root; given in the environment, not on the command line
            rc_user, rc_pass = "bench", secrets.token_hex(16)
            t.env = {**rclone_env(sw), "RCLONE_RC_USER": rc_user, "RCLONE_RC_PASS": rc_pass}
            t.probe_key = "rclone/"
            t.settle = RcloneSettle(rc_port, (rc_user, rc_pass), t, tool, "rclone/")
            t.pre_mount = lambda t=t: open(os.path.join(t.work, "rclone.conf"), "w").close()
            targets.append(t)
            versions["rclone"] = tool_version([rc, "version"])

    if "s3fs" in wanted:
        s3fs = peer_bin("s3fs")
        if not os.access(s3fs, os.X_OK):
            absent["s3fs"] = f"{s3fs} not installed (scripts/setup --bench-peers: Debian's s3fs)"
        else:
            t = B.FuseTarget("s3fs", base("s3fs"),
                             [s3fs, f"{BUCKET}:/s3fs", "{mnt}", "-f",
                              "-o", f"url={sw.endpoint}", "-o", "use_path_request_style",
                              "-o", f"endpoint={seaweed.REGION}",
                              "-o", "passwd_file={work}/passwd"],
                             None, mt)
            t.probe_key = "s3fs/"
            t.pre_mount = lambda t=t: s3fs_prepare(t)
            targets.append(t)
            versions["s3fs"] = tool_version([s3fs, "--version"])
    return targets, absent, versions


def juicefs_format(t, jfs: str, sw: SeaweedFs) -> None:
    cmd = [jfs, "format", "--storage", "s3", "--bucket", f"{sw.endpoint}/{BUCKET}",
           "--trash-days", "0", f"sqlite3://{t.work}/meta.db", "juicefs"]
    r = subprocess.run(cmd, env=t.env, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"juicefs format failed ({r.returncode}): {(r.stdout + r.stderr).strip()[-1500:]}")


def s3fs_prepare(t) -> None:
    pw = os.path.join(t.work, "passwd")
    fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{seaweed.ACCESS_KEY}:{seaweed.SECRET_KEY}\n")


class RcloneSettle:
    """settle() for rclone, which uploads after close() returns: wait until rclone has no upload
    in progress or queued, as its remote control tells (core/stats `transferring`, vfs/queue,
    vfs/stats), for QUIET seconds in a row (an upload starts a moment after close() returns:
    the kernel sends RELEASE after close() returns). The seconds until that quiet stretch
    began are returned. Then (untimed) each file written must be in S3 with the size the mount
    shows, or the figure would be wrong: a mismatch that clears later is an error."""

    QUIET = 0.2

    def __init__(self, port: int, auth: tuple[str, str], target, tool: S3Tool, prefix: str,
                 timeout: float = 600):
        self.base = f"http://127.0.0.1:{port}"
        self.auth = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        self.target, self.tool, self.prefix, self.timeout = target, tool, prefix, timeout

    def rc(self, command: str, **params) -> dict:
        req = urllib.request.Request(f"{self.base}/{command}", data=json.dumps(params).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": self.auth})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def pending(self) -> int:
        n = len(self.rc("core/stats").get("transferring") or [])
        n += len(self.rc("vfs/queue").get("queue") or [])
        dc = self.rc("vfs/stats").get("diskCache") or {}
        return n + dc.get("uploadsInProgress", 0) + dc.get("uploadsQueued", 0)

    def __call__(self, paths=()) -> float:
        t0 = time.perf_counter()
        quiet_since = None
        while True:
            now = time.perf_counter()
            if self.pending():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= self.QUIET:
                break
            bad = self.target.healthy()
            if bad:
                raise RuntimeError(f"rclone: {bad} while waiting for its uploads")
            if now - t0 > self.timeout:
                raise RuntimeError(f"rclone: uploads still pending after {self.timeout:g} s")
            time.sleep(0.005)
        waited = quiet_since - t0
        if paths:
            self.verify(paths, waited)
        return waited

    def verify(self, paths, waited: float) -> None:
        want = {}
        for p in paths:
            rel = os.path.relpath(p, self.target.root)
            want[self.prefix + rel] = os.stat(p).st_size
        dirs = sorted({k.rsplit("/", 1)[0] + "/" for k in want})
        t0 = time.perf_counter()
        first = True
        while True:
            have = {}
            for d in dirs:
                have.update(self.tool.run("list", d))
            missing = [k for k, n in want.items() if have.get(k) != n]
            if not missing:
                if first:
                    return
                raise RuntimeError(
                    f"rclone: its remote control showed no upload pending after {waited:.2f} s, but "
                    f"{n_missing} of {len(want)} files written were in S3 with their size only "
                    f"{time.perf_counter() - t0:.2f} s later: its 'uploaded' figure would be wrong")
            if first:
                n_missing = len(missing)
            first = False
            if time.perf_counter() - t0 > 60:
                raise RuntimeError(f"rclone: {len(missing)} of {len(want)} files written are not in S3 "
                                   f"with their size 60 s after rclone had no upload pending "
                                   f"(first: {missing[0]}: {have.get(missing[0])} bytes)")
            time.sleep(0.1)


def probe(t, tool: S3Tool) -> None:
    """Write a file through the mount and find it in SeaweedFS, or raise Absent."""
    data = os.urandom(4096)
    name = "bench-probe"
    before = len(tool.run("list", "juicefs/chunks/")) if t.name == "juicefs" else 0
    p = os.path.join(t.root, name)
    with open(p, "wb") as f:
        f.write(data)
    if t.settle is not None:
        t.settle([p])
    want = hashlib.sha256(data).hexdigest()
    if t.name == "juicefs":
        after = len(tool.run("list", "juicefs/chunks/"))
        if after <= before:
            raise Absent(f"a file written through the mount left no object under juicefs/chunks/ "
                         f"({before} before, {after} after)")
    else:
        got = tool.run("get", t.probe_key + name) or "missing"
        if got != want:
            raise Absent(f"{t.probe_key}{name} in SeaweedFS is {got}, not the file written "
                         f"through the mount (sha256 {want[:16]}...)")
    with open(p, "rb") as f:
        if f.read() != data:
            raise Absent("the probe file reads back wrong through the mount")
    os.unlink(p)
    if t.settle is not None:
        t.settle()


# ------------------------------------------------------------ cold read ---

COLD_SRC = "raw/cold-source"


def group_cold(t, B, tool: S3Tool, size: int, rnd_no: int, timeout: float):
    """Sequential read through the mount of an object another client stored (a server-side copy
    of COLD_SRC into the target's prefix): the read path from S3, not from a cache of the
    target's own writes. MB/s, or the exception."""
    name = f"cold-{rnd_no}.bin"
    p = os.path.join(t.root, name)
    try:
        bad = t.healthy()
        if bad:
            raise RuntimeError(f"{t.name}: {bad}")
        tool.run("copy", COLD_SRC, t.probe_key + name)
        if t.name == "rclone":  # else its directory cache hides new objects for 5 min (--dir-cache-time)
            t.settle.rc("vfs/refresh")
        time.sleep(2)  # past the targets' attribute and entry TTLs (roomfs: 1 s for S3 rooms)
        os.sync()
        with B.Watchdog(t, timeout, "cold read") as wd:
            try:
                t0 = time.perf_counter()
                fd = os.open(p, os.O_RDONLY)
                total = bad_chunks = 0
                try:
                    while True:
                        b = os.read(fd, MiB)
                        if not b:
                            break
                        if len(b) == MiB and total % MiB == 0 and b[:8] != (total // MiB).to_bytes(8, "little"):
                            bad_chunks += 1
                        total += len(b)
                finally:
                    os.close(fd)
                dt = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                if wd.fired.is_set():
                    raise B.WorkloadError(f"timed out after {timeout:g} s ({type(e).__name__}: {e})") from e
                raise
        if total != size:
            raise B.WorkloadError(f"cold read: read {total} bytes, expected {size}")
        if bad_chunks:
            raise B.WorkloadError(f"cold read: {bad_chunks} chunks with a wrong header")
        os.unlink(p)
        return size / 1e6 / dt
    except Exception as e:  # noqa: BLE001
        return e


# ----------------------------------------------------------- raw client ---

def raw_round(tool: S3Tool, sw: SeaweedFs, src: str, size: int, rnd_no: int) -> dict:
    """One round of the raw clients: {"boto3": {"seq-write": MB/s, ...}, "rclone": {...}};
    a client that fails gives exceptions as values."""
    out = {}
    mb = size / 1e6
    try:
        os.sync()
        key = f"raw/boto3-{rnd_no}"
        w = tool.run("upload", src, key, timeout=600)
        os.sync()
        r = tool.run("download", key, size, timeout=600)
        out["boto3"] = {"seq-write": mb / w, "seq-read": mb / r}
    except Exception as e:  # noqa: BLE001
        out["boto3"] = {"seq-write": e, "seq-read": e}
    rc = peer_bin("rclone")
    if not os.access(rc, os.X_OK):
        err = RuntimeError(f"{rc} not installed (scripts/setup --bench-peers)")
        out["rclone"] = {"seq-write": err, "seq-read": err}
        return out
    env = rclone_env(sw)
    conf = os.path.join(os.path.dirname(src), "rclone.conf")
    open(conf, "w").close()
    key = f"sw:{BUCKET}/raw/rclone-{rnd_no}"
    try:
        os.sync()
        t0 = time.perf_counter()
        subprocess.run([rc, "--config", conf, "copyto", src, key], env=env, check=True, timeout=600,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        w = time.perf_counter() - t0
        os.sync()
        t0 = time.perf_counter()
        p = subprocess.Popen([rc, "--config", conf, "cat", key], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        n = 0
        while True:
            b = p.stdout.read(MiB)
            if not b:
                break
            n += len(b)
        err = p.stderr.read()
        rc_ = p.wait(timeout=600)
        r = time.perf_counter() - t0
        if rc_ != 0 or n != size:
            raise RuntimeError(f"rclone cat: exit {rc_}, {n} of {size} bytes: {err.decode(errors='replace')[-500:]}")
        out["rclone"] = {"seq-write": mb / w, "seq-read": mb / r}
    except subprocess.CalledProcessError as e:
        err = RuntimeError(f"rclone copyto: exit {e.returncode}: {(e.stderr or b'').decode(errors='replace')[-500:]}")
        out["rclone"] = {"seq-write": err, "seq-read": err}
    except Exception as e:  # noqa: BLE001
        out["rclone"] = {"seq-write": e, "seq-read": e}
    return out


def make_raw_source(path: str, size: int, rnd: random.Random) -> None:
    """The file the raw clients upload: the pattern group_seq writes (untimed, in the page cache)."""
    base = bytearray(rnd.randbytes(MiB))
    with open(path, "wb") as f:
        for i in range(size // MiB):
            base[0:8] = i.to_bytes(8, "little")
            f.write(base)


# --------------------------------------------------------------- report ---

def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "FAIL"
    if x >= 0.1:
        return f"{x:.2f}"
    digits = max(2, 1 - math.floor(math.log10(x))) if x > 0 else 2
    return f"{x:.{digits}f}"


def med(xs):
    return statistics.median(xs) if xs else None


def per_round(a: list, b: list, f) -> list:
    """f(a_i, b_i) for the rounds where both are numbers."""
    return [f(x, y) for x, y in zip(a, b) if not isinstance(x, BaseException)
            and not isinstance(y, BaseException) and x is not None and y is not None and y > 0]


def errors_of(vals: list) -> list[str]:
    return [f"round {i + 1}: {type(v).__name__}: {v}" for i, v in enumerate(vals) if isinstance(v, BaseException)]


def summarize(results: dict, cols: list[str]) -> dict:
    """results[col][wl] = per-round list (float | Exception); cols includes native."""
    nat_all = results["native"]
    out = {}
    for wl, unit in WORKLOADS + [(w + "/stored", "") for w in STORED]:
        base = wl.split("/")[0]
        nat = nat_all[base]
        row = {}
        for c in cols:
            vals = results.get(c, {}).get(wl)
            if vals is None:
                continue
            errs = errors_of(vals)
            good = [v for v in vals if not isinstance(v, BaseException)]
            col = {"values": [None if isinstance(v, BaseException) else v for v in vals], "errors": errs,
                   "median": med(good) if good and not errs else None}
            if c != "native":
                rs = per_round(vals, nat, lambda v, n: v / n)
                ok = not errs and not errors_of(nat)
                col["ratios"] = rs
                col["ratio"] = med(rs) if ok and rs else None
                col["spread"] = (min(rs), max(rs)) if ok and rs else None
            row[c] = col
        out[wl] = row
    return out


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def render(summary: dict, results: dict, fuse_cols: list[str], absent: dict, sz, header: list[str]) -> str:
    """Markdown, to paste into doc/PERFORMANCE.md. Every target asked for has a column; an
    absent one says ABSENT in each of its cells."""
    cols = [c for c in ["roomfs", *PEERS] if c in fuse_cols or c in absent]
    peers = [p for p in PEERS if p in fuse_cols]
    roomfs_in = "roomfs" in fuse_cols
    vs_js = [p for p in ("juicefs", "s3fs") if p in peers] if roomfs_in else []
    vs_rc = roomfs_in and "rclone" in peers
    raw = results.get("raw")
    out = [*header, ""]

    # 1. ratios to native
    head = ["workload", "native"] + [LABEL[c] for c in cols]
    if peers:
        head.append("best peer")
    if vs_js:
        head.append(f"roomfs ÷ best of {', '.join(LABEL[p] for p in vs_js)} (goal ≥ {GOAL_VS_JUICEFS_S3FS:g})")
    if vs_rc:
        head.append("roomfs ÷ rclone (goal ≥ 1 where given; writes: then ÷ its figure until uploaded)")
    rows = []
    for wl, unit in WORKLOADS:
        row = summary[wl]
        nat = row["native"]["median"]
        r = [describe(wl, sz), "FAIL" if nat is None else B_fmt_val(nat, unit)]
        for c in cols:
            if c in absent:
                r.append("ABSENT")
            elif row[c]["ratio"] is None:
                r.append("FAIL")
            elif c == "roomfs":
                lo, hi = row[c]["spread"]
                r.append(f"**{fmt_ratio(row[c]['ratio'])}** ({fmt_ratio(lo)}..{fmt_ratio(hi)})")
            else:
                r.append(fmt_ratio(row[c]["ratio"]))
        if peers:
            best = [(row[p]["ratio"], p) for p in peers if row[p]["ratio"] is not None]
            r.append(f"{fmt_ratio(max(best)[0])} ({LABEL[max(best)[1]]})" if best else "FAIL")
        if vs_js:
            r.append(goal_cell(results, wl, "roomfs", vs_js, None if wl in NO_GOAL else GOAL_VS_JUICEFS_S3FS))
        if vs_rc:
            c = goal_cell(results, wl, "roomfs", ["rclone"], 1.0 if wl in VS_RCLONE else None)
            if wl in STORED:
                c += "; " + goal_cell(results, wl, "roomfs", ["rclone"], None, wl + "/stored") + " uploaded"
            r.append(c)
        rows.append(r)
    out += table(head, rows)

    # 2. rclone's writes, as close() returns and as stored
    if "rclone" in fuse_cols:
        out += ["", "rclone returns from close() before it uploads (JuiceFS, s3fs and roomfs upload first): "
                "its writes, ratio to native, when the last close() returned (as above) and when its "
                "uploads were done:", ""]
        head = ["workload", "rclone, close() returned", "rclone, uploaded"] + (["roomfs"] if roomfs_in else [])
        rows = []
        for wl in STORED:
            r = [describe(wl, sz), fmt_ratio(summary[wl]["rclone"]["ratio"]),
                 fmt_ratio(summary[wl + "/stored"]["rclone"]["ratio"])]
            if roomfs_in:
                r.append(fmt_ratio(summary[wl]["roomfs"]["ratio"]))
            rows.append(r)
        out += table(head, rows)

    # 3. sequential I/O, and a raw client
    if cols or raw is not None:
        out += ["", f"Sequential throughput, {sz.seq_bytes // MiB} MiB, medians. Mounts: write until close() "
                "returned (rclone: until uploaded); cached read: the file just written; cold read: an "
                "object another S3 client stored (not JuiceFS: it reads only its own chunk format). "
                "Raw clients on the same SeaweedFS: boto3 upload_file / download_fileobj at its "
                "defaults (8 MiB parts, 10 threads, CRC32 checksums), and the rclone command line, "
                "`rclone copyto` / `rclone cat`, timed as whole commands:", ""]
        head = ["sequential"] + (["boto3", "rclone CLI", "best raw"] if raw is not None else [])
        head += [LABEL[c] for c in cols]
        if roomfs_in and raw is not None:
            head.append(f"roomfs ÷ best raw (goal ≥ {GOAL_VS_RAW:g})")
        rows = []
        for what, raw_wl, wl in (("write", "seq-write", "seq-write/stored"), ("read, cached", None, "seq-read"),
                                 ("read, cold", "seq-read", "cold-read")):
            r = [what]
            best = None
            if raw is not None:
                if raw_wl is None:
                    r += ["", "", ""]
                else:
                    b, c2 = raw["boto3"][raw_wl], raw["rclone"][raw_wl]
                    best = [max(x, y) if not isinstance(x, BaseException) and not isinstance(y, BaseException)
                            else (x if not isinstance(x, BaseException) else y) for x, y in zip(b, c2)]
                    r += [mb_cell(b), mb_cell(c2), mb_cell(best)]
            for c in cols:
                if c in absent:
                    r.append("ABSENT")
                else:
                    vals = results[c][wl]
                    r.append("n/a" if not vals else mb_cell(vals))
            if roomfs_in and raw is not None:
                if best is None:
                    r.append("")
                else:
                    rs = per_round(results["roomfs"][wl], best, lambda a, x: a / x)
                    if rs and not errors_of(results["roomfs"][wl]):
                        m = med(rs)
                        r.append(f"**{fmt_ratio(m)}** ({fmt_ratio(min(rs))}..{fmt_ratio(max(rs))})"
                                 + (" ✓" if m >= GOAL_VS_RAW else " below"))
                    else:
                        r.append("FAIL")
            rows.append(r)
        out += table(head, rows)

    # 4. absolute medians
    out += ["", "Medians, absolute:", ""]
    head = ["workload", "native"] + [LABEL[c] for c in cols]
    rows = []
    for wl, unit in WORKLOADS:
        r = [wl]
        for c in ["native", *cols]:
            if c in absent:
                r.append("ABSENT")
            else:
                m = summary[wl][c]["median"]
                r.append("FAIL" if m is None else B_fmt_val(m, unit))
        rows.append(r)
    out += table(head, rows)
    return "\n".join(out)


def mb_cell(vals: list) -> str:
    if errors_of(vals):
        return "FAIL"
    return B_fmt_val(med(vals), "MB/s")


def goal_cell(results, wl, mine, others, goal, others_wl=None) -> str:
    """Median over rounds of mine / best of others in that round, with the goal's verdict
    (others_wl: the others' figure to divide by, if not wl's)."""
    m = results[mine][wl]
    if errors_of(m):
        return "FAIL"
    owl = others_wl or wl
    best = []
    for i in range(len(m)):
        vs = [results[o][owl][i] for o in others if not isinstance(results[o][owl][i], BaseException)]
        best.append(max(vs) if vs else RuntimeError("no peer result"))
    rs = per_round(m, best, lambda a, b: a / b)
    if not rs:
        return "FAIL"
    x = med(rs)
    s = f"{fmt_ratio(x)}×"
    if goal is not None:
        s += " ✓" if x >= goal else " below"
    return s


B_fmt_val = None  # bench.fmt_val, set by main()


# ----------------------------------------------------------------- main ---

def mount_all(B, fuse: list, tool: S3Tool, absent: dict, mounted: list) -> list:
    """Mounts each of `fuse` and probes that it stores in SeaweedFS; returns those that do.
    Each is added to `mounted` before its setup (so that it is torn down whatever happens);
    one that fails is torn down again and its reason goes into `absent`."""
    log = B.log
    targets = []
    for t in fuse:
        mounted.append(t)  # registered first: torn down even if setup is interrupted
        try:
            for d in (t.src, t.work, t.mnt):
                os.makedirs(d, exist_ok=True)
            pre = getattr(t, "pre_mount", None)
            if pre:
                pre()
            t.setup()
            with B.Watchdog(t, 120, "probe"):
                probe(t, tool)
            targets.append(t)
        except B.Interrupted:
            raise
        except Exception as e:  # noqa: BLE001
            msg = str(e) if isinstance(e, (Absent, RuntimeError)) else f"{type(e).__name__}: {e}"
            if t.ready:
                msg = f"mounted, but {msg}"
            absent[t.name] = msg
            t.setup_error = msg
            log(f"[{t.name}] ABSENT: {msg}")
            if t.ready:
                tail = t.log_tail()
                log(f"[{t.name}] daemon output (tail):\n{tail}")
            t.teardown()
    return targets


def start_store(sw: SeaweedFs, tool: S3Tool, workdir: str) -> str:
    """Starts the run's SeaweedFS and the boto3 helper that checks it; returns its version."""
    why = tool.available()
    if why:
        raise RuntimeError(why)
    os.makedirs(sw.base)
    sw.start()
    tool.start(os.path.join(workdir, "s3client.err"))
    return tool_version([sw.weed, "version"])


def tear_down(B, args, mounted: list, tool: S3Tool, sw: SeaweedFs, workdir: str,
              proxy: subprocess.Popen | None = None) -> int:
    """Unmounts what was mounted, stops the servers, removes the scratch dir (unless --keep or
    a mount is left behind: then 3, else 0)."""
    log = B.log
    B.ignore_signals()
    for tg in reversed(mounted):
        if tg.ready and tg.proc is not None and tg.proc.poll() is not None:
            log(f"[{tg.name}] daemon died during the run; output (tail):\n{tg.log_tail()}")
        try:
            tg.teardown()
        except Exception as e:  # noqa: BLE001
            log(f"[{tg.name}] teardown error: {e}")
    tool.stop()
    if proxy is not None:
        proxy.kill()
        proxy.wait()
    try:
        sw.stop()
    except Exception as e:  # noqa: BLE001
        log(f"[seaweedfs] stop error: {e}")
    left = B.mounts_under(workdir)
    if left:
        log(f"ERROR: mounts left behind: {left}; not removing {workdir}")
        return 3
    if args.keep:
        log(f"kept scratch dir {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(args, B) -> int:
    global B_fmt_val
    B_fmt_val = B.fmt_val
    log = B.log
    wanted = TARGETS if args.s3_targets is None else [x.strip() for x in args.s3_targets.split(",") if x.strip()]
    unknown = [w for w in wanted if w not in TARGETS]
    if unknown or not wanted:
        log(f"error: --s3-targets: unknown {unknown} (known: {','.join(TARGETS)})")
        return 2
    if args.fs_cmd or args.target != "roomfs" or args.peers:
        log("note: --fs-cmd, --target and --peers apply to the local store only; ignored")

    if args.install_peers:
        setup = os.path.join(B.REPO, "scripts", "setup")
        log(f"installing peers: {setup} --bench-peers")
        subprocess.run([setup, "--bench-peers"], check=False, stdout=sys.stderr)

    sz = s3_sizes(B, args)
    parent = args.workdir or "/var/tmp"
    os.makedirs(parent, exist_ok=True)
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="roomfs-bench-s3-", dir=parent))
    log(f"scratch dir: {workdir}")
    sw = SeaweedFs(os.path.join(workdir, "seaweedfs"), log=log)
    tool = S3Tool(sw)
    absent: dict[str, str] = {}
    versions: dict[str, str] = {}
    targets: list = []
    mounted: list = []
    results: dict = {}
    loads: list[float] = []
    started = time.monotonic()
    load_start = os.getloadavg()
    interrupted = None
    rc = 0
    try:
        versions["seaweedfs"] = start_store(sw, tool, workdir)
        native = B.NativeTarget("native", os.path.join(workdir, "native"))
        native.setup()
        fuse, absent, v = make_targets(B, args, sw, tool, workdir, wanted)
        versions.update(v)
        for n, why in absent.items():
            log(f"[{n}] ABSENT: {why}")
        targets = mount_all(B, fuse, tool, absent, mounted)
        raw_on = "raw" in wanted
        all_t = [native, *targets]
        names = [t.name for t in all_t]
        for n in names:
            results[n] = {w: [] for w, _ in WORKLOADS}
            results[n].update({w + "/stored": [] for w in STORED})
            results[n]["cold-read"] = []
        if raw_on:
            results["raw"] = {"boto3": {"seq-write": [], "seq-read": []},
                              "rclone": {"seq-write": [], "seq-read": []}}
        raw_src = os.path.join(workdir, "raw", "seq.bin")
        os.makedirs(os.path.dirname(raw_src))
        make_raw_source(raw_src, sz.seq_bytes, random.Random(7))
        cold = [t for t in targets if t.name != "juicefs"]  # JuiceFS reads only its own chunk format
        if cold:
            tool.run("upload", raw_src, COLD_SRC, timeout=600)
        for rnd_no in range(args.rounds):
            log(f"round {rnd_no + 1}/{args.rounds}")
            for gi, (group, wls) in enumerate(GROUPS):
                seed = rnd_no * 1000 + gi
                for tg in B.rotated(all_t, rnd_no):
                    loads.append(os.getloadavg()[0])
                    t0 = time.monotonic()
                    res = B.run_group(tg, group, wls, seed, sz, rnd_no, args.timeout)
                    if tg.settle is not None:  # nothing of this target's left running (untimed)
                        try:
                            tg.settle()
                        except Exception as e:  # noqa: BLE001
                            res = {w: e for w in wls}
                    for w in wls:
                        results[tg.name][w].append(res[w])
                        if w in STORED:  # the same figure for targets that upload before close() returns
                            results[tg.name][w + "/stored"].append(res.get(w + "/stored", res[w]))
                    st = " ".join(("FAIL" if isinstance(res[w], BaseException) else f"{res[w]:.0f}") for w in wls)
                    extra = " ".join(f"{k.split('/')[0]}(uploaded) {v:.0f}" for k, v in res.items()
                                     if k.endswith("/stored") and not isinstance(v, BaseException))
                    log(f"  {group:8s} {tg.name:10s} {st}{'  ' + extra if extra else ''}  "
                        f"({time.monotonic() - t0:.1f}s)")
                if group == "seq" and raw_on:
                    loads.append(os.getloadavg()[0])
                    t0 = time.monotonic()
                    rr = raw_round(tool, sw, raw_src, sz.seq_bytes, rnd_no)
                    for client, vals in rr.items():
                        for w, v in vals.items():
                            results["raw"][client][w].append(v)
                    log("  raw      " + "  ".join(
                        f"{c}: " + " ".join("FAIL" if isinstance(v, BaseException) else f"{v:.0f}" for v in vals.values())
                        for c, vals in rr.items()) + f"  ({time.monotonic() - t0:.1f}s)")
                    for c, vals in rr.items():
                        for v in vals.values():
                            if isinstance(v, BaseException):
                                log(f"  raw {c}: {v}")
                                break
                if group == "seq":
                    for tg in B.rotated(cold, rnd_no):
                        loads.append(os.getloadavg()[0])
                        t0 = time.monotonic()
                        v = group_cold(tg, B, tool, sz.seq_bytes, rnd_no, args.timeout)
                        results[tg.name]["cold-read"].append(v)
                        log(f"  cold     {tg.name:10s} {'FAIL: ' + str(v) if isinstance(v, BaseException) else f'{v:.0f}'}"
                            f"  ({time.monotonic() - t0:.1f}s)")
            if not sw.running():
                raise RuntimeError(f"SeaweedFS exited during the run; its log:\n{sw.log_tail()}")
    except (B.Interrupted, Exception) as e:  # noqa: BLE001
        interrupted = B.stopped_by(e)
    finally:
        rc = tear_down(B, args, mounted, tool, sw, workdir)
    if interrupted is not None:
        return rc or (130 if "SIG" in interrupted else 2)

    fuse_cols = [t.name for t in targets]
    summary = summarize(results, ["native", *fuse_cols])
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    load_end = os.getloadavg()
    header = [
        f"# {now} | kernel {os.uname().release} | {os.cpu_count()} CPUs | commit {B.git_commit()} | "
        f"{args.rounds} rounds | {time.monotonic() - started:.0f} s",
        f"# sizes: {sz.describe()}",
        "# " + "; ".join(f"{k} {v}" for k, v in versions.items()),
        f"# load average (1 min) while running: {min(loads, default=0):.1f}..{max(loads, default=0):.1f}, "
        f"median {med(loads) or 0:.1f}; (1/5/15 min) at start {' '.join(f'{x:.1f}' for x in load_start)}, "
        f"at end {' '.join(f'{x:.1f}' for x in load_end)}",
        "# ratio = target/native in the same round, median over rounds (roomfs: min..max in brackets); "
        "higher is better",
    ]
    for n, why in absent.items():
        header.append(f"# ABSENT {LABEL[n]}: {why}")
    print(render(summary, results, fuse_cols, absent, sz, header))
    fails = []
    for wl, row in summary.items():
        for n, c in row.items():
            for e in c["errors"]:
                fails.append(f"FAIL {wl} [{n}] {e}")
    if "raw" in results:
        for client, vals in results["raw"].items():
            for w, v in vals.items():
                for e in errors_of(v):
                    fails.append(f"FAIL raw {client} {w} {e}")
    for n in fuse_cols:
        for e in errors_of(results[n]["cold-read"]):
            fails.append(f"FAIL cold-read [{n}] {e}")
    for f in fails:
        print(f)
    for n, why in absent.items():
        log(f"ABSENT {LABEL[n]}: {why}")
    if args.json:
        def clean(x):
            if isinstance(x, BaseException):
                return f"{type(x).__name__}: {x}"
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x
        doc = {"date": now, "kernel": os.uname().release, "cpus": os.cpu_count(), "commit": B.git_commit(),
               "store": "s3", "rounds": args.rounds, "sizes": sz.describe(), "versions": versions,
               "load_1min": loads, "targets": fuse_cols, "absent": absent,
               "seaweedfs": {"endpoint": sw.endpoint if sw.ports else None, "ports": sw.ports},
               "workloads": clean(summary), "raw": clean(results.get("raw")),
               "cold_read": {n: clean(results[n]["cold-read"]) for n in fuse_cols}, "failures": fails}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    if fails or absent:
        rc = rc or 1
    return rc


# --------------------------------------------------------------- agents ---
#
# `scripts/bench --store s3 --agents 1,8,16 [--s3-latency-ms MS]`: bench.py's concurrency
# benchmark (N agent processes at once, each creating, writing and reading back its own 4 KiB
# files) on roomfs and the S3 peers that upload before close() returns (JuiceFS, s3fs), on one
# SeaweedFS, interleaved by round. With --s3-latency-ms every request reaches SeaweedFS
# through a proxy that holds it that long (latency.py), as a store across a network would:
# throughput then grows with the agents only as far as a mount keeps several requests in
# flight. There is no native baseline (a local disk has no round trips to overlap).

AGENT_TARGETS = ["roomfs", "juicefs", "s3fs"]


class Delayed:
    """SeaweedFS as the targets reach it through the delaying proxy at `endpoint`."""

    def __init__(self, sw: SeaweedFs, endpoint: str):
        self.sw = sw
        self.endpoint = endpoint

    def env(self) -> dict:
        return {**self.sw.env(), "AWS_ENDPOINT_URL": self.endpoint}


def start_proxy(sw: SeaweedFs, delay_ms: float, log) -> tuple[subprocess.Popen, str]:
    """The delaying proxy in front of `sw`'s S3 port: (its process, its endpoint)."""
    import socket
    port = seaweed.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench_lib.latency", str(port),
                             str(sw.ports["s3"]), str(delay_ms)],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the latency proxy did not start (status {proc.poll()})")
            time.sleep(0.05)
    log(f"requests go through a proxy adding {delay_ms:g} ms (127.0.0.1:{port})")
    return proc, f"http://127.0.0.1:{port}"


def agents_main(args, B) -> int:
    log = B.log
    started = time.monotonic()
    wanted = (AGENT_TARGETS if args.s3_targets is None
              else [x.strip() for x in args.s3_targets.split(",") if x.strip()])
    unknown = [w for w in wanted if w not in AGENT_TARGETS]
    if unknown or not wanted:
        log(f"error: --s3-targets with --agents: unknown {unknown} (known: {','.join(AGENT_TARGETS)};"
            f" rclone returns from close() before it uploads)")
        return 2
    parent = args.workdir or "/var/tmp"
    os.makedirs(parent, exist_ok=True)
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="roomfs-bench-s3-agents-", dir=parent))
    log(f"scratch dir: {workdir}")
    sw = SeaweedFs(os.path.join(workdir, "seaweedfs"), log=log)
    tool = S3Tool(sw)
    proxy = None
    view = sw
    absent: dict[str, str] = {}
    versions: dict[str, str] = {}
    mounted: list = []
    targets: list = []
    results: dict = {}
    loads: list[float] = []
    load_start = os.getloadavg()
    interrupted = None
    rc = 0
    try:
        versions["seaweedfs"] = start_store(sw, tool, workdir)
        if args.s3_latency_ms:
            proxy, endpoint = start_proxy(sw, args.s3_latency_ms, log)
            view = Delayed(sw, endpoint)
        fuse, absent, v = make_targets(B, args, view, tool, workdir, wanted)
        versions.update(v)
        targets = mount_all(B, fuse, tool, absent, mounted)
        results = {t.name: {n: [] for n in args.agents} for t in targets}
        for rnd in range(args.rounds):
            log(f"round {rnd + 1}/{args.rounds}")
            for n in args.agents:
                for t in B.rotated(targets, rnd):
                    loads.append(os.getloadavg()[0])
                    res = B.run_agents(t, os.path.join(t.root, f"r{rnd}-a{n}"), n, args.agent_files,
                                       rnd * 1000 + n, args.timeout, False, False)
                    results[t.name][n].append(res)
                    log(f"  agents {n:3d} {t.name:8s} " + (
                        f"FAIL: {res['error']}" if "error" in res else
                        f"{res['ops_s']:.0f} files/s" + (f", daemon {res['cpu_us']:.0f} us/file"
                                                         if "cpu_us" in res else "")))
            if not sw.running():
                raise RuntimeError(f"SeaweedFS exited during the run; its log:\n{sw.log_tail()}")
    except (B.Interrupted, Exception) as e:  # noqa: BLE001
        interrupted = B.stopped_by(e)
    finally:
        rc = tear_down(B, args, mounted, tool, sw, workdir, proxy)
    if interrupted is not None:
        return rc or (130 if "SIG" in interrupted else 2)

    names = [t.name for t in targets]
    peers = [n for n in names if n != "roomfs"]
    fails = [f"FAIL agents={n} [{t}] round {i + 1}: {r['error']}"
             for t in names for n in args.agents for i, r in enumerate(results[t][n]) if "error" in r]

    def ok(t, n, key="ops_s"):
        return [r.get(key) for r in results[t][n] if "error" not in r and r.get(key) is not None]

    def cell(vals, f="{:.0f}"):
        return f.format(statistics.median(vals)) if vals else "FAIL"

    def per_round(n, f):
        """Medians over rounds of f(round's results of every target), rounds all succeeded."""
        vals = []
        for i in range(args.rounds):
            rs = {t: results[t][n][i] for t in names}
            if all("error" not in r for r in rs.values()):
                v = f(rs)
                if v is not None:
                    vals.append(v)
        return vals

    head = ["agents"] + [f"{LABEL[t]} files/s" for t in names]
    if "roomfs" in names:
        head += ["roomfs × vs 1 agent", "roomfs daemon µs/file"]
        if peers:
            head.append("roomfs ÷ best peer")
    rows = []
    first = args.agents[0]
    for n in args.agents:
        row = [str(n)] + [cell(ok(t, n)) for t in names]
        if "roomfs" in names:
            scale = [r["ops_s"] / r1["ops_s"] for r, r1 in zip(results["roomfs"][n], results["roomfs"][first])
                     if "error" not in r and "error" not in r1]
            row += [cell(scale, "{:.2f}"), cell(ok("roomfs", n, "cpu_us"))]
            if peers:
                row.append(cell(per_round(n, lambda rs: rs["roomfs"]["ops_s"]
                                          / max(rs[p]["ops_s"] for p in peers)), "{:.2f}"))
        rows.append(row)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    load_end = os.getloadavg()
    lat = (f"{args.s3_latency_ms:g} ms added to every request (bench_lib/latency.py)"
           if args.s3_latency_ms else "no added latency")
    print(f"# {now} | kernel {os.uname().release} | {os.cpu_count()} CPUs | commit {B.git_commit()}"
          f" | {args.rounds} rounds, {args.agent_files} files of 4 KiB per agent, {lat}"
          f" | {time.monotonic() - started:.0f} s")
    print("# " + "; ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"# load average (1 min) while running: {min(loads, default=0):.1f}..{max(loads, default=0):.1f};"
          f" (1/5/15 min) at start {' '.join(f'{x:.1f}' for x in load_start)},"
          f" at end {' '.join(f'{x:.1f}' for x in load_end)}")
    print(f"# a file: create + write + close, then open + read + close; medians of the rounds;"
          f" x vs 1 agent: against {first} agent(s) in the same round")
    for n, why in absent.items():
        print(f"# ABSENT {LABEL[n]}: {why}")
    print("\n".join(table(head, rows)))
    for f in fails:
        print(f)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": now, "commit": B.git_commit(), "store": "s3", "cpus": os.cpu_count(),
                       "rounds": args.rounds, "agents": args.agents, "files": args.agent_files,
                       "latency_ms": args.s3_latency_ms, "versions": versions, "absent": absent,
                       "seaweedfs": {"endpoint": sw.endpoint if sw.ports else None, "ports": sw.ports},
                       "proxy": ({"pid": proxy.pid, "endpoint": view.endpoint}
                                 if proxy is not None else None),
                       "results": {t: {str(n): [{k: (str(v) if k == "error" else v) for k, v in r.items()}
                                               for r in rs] for n, rs in per.items()}
                                   for t, per in results.items()},
                       "failures": fails}, f, indent=2)
    return rc or (1 if fails or absent else 0)
