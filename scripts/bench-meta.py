#!/usr/bin/env python3
"""roomfs `.meta` benchmark: a session's records as JSON files, against a native directory.

Builds a records dir (the experimental-agent localStorage layout, records shaped like
tests/fixtures/agent-records) holding one session of 10,000 messages and 50,000 parts among
100 other sessions of 100 messages and 500 parts each, mounts that session with
`roomfs mount --session ID --records-dir DIR` (one mount per --roomfs-bin, so two builds can be
compared in one run), and copies the mount's `.meta` into a native directory, so both hold the
same bytes. Each round then runs, on the native copy and on every mount in turn:

  ls -l      `ls -l .meta/messages` (10,000 entries: readdir and a stat each)
  cat        `cat .meta/history.json` (every message with its parts, one document)
  stat       os.stat() of every file in .meta/parts, in name order (50,000 stats)

Every result is the time one operation takes; the table shows medians over rounds of those
times and of the per-round ratios native/target (higher is better; 1.0 is native speed), plus
the min..max spread of the ratios. Nothing is pass/fail on time; a run FAILs only when a
mount shows something other than the native copy (checked after every timed operation: the
listing's names and sizes, the history's size and digest, the stat count).

Usage (normally through scripts/bench-meta, which builds first):
  python3 scripts/bench-meta.py [--rounds N] [--quick] [--roomfs-bin NAME=PATH]...
                                [--workdir DIR] [--json FILE] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "agent-records")
SESSION = "ses_bench"
WORKLOADS = [("ls -l", "ls -l .meta/messages"), ("cat", "cat .meta/history.json"),
             ("stat", "stat loop over .meta/parts")]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Mismatch(Exception):
    """A mount showed something other than the native copy."""


# ------------------------------------------------------------ records ---

def fixture(collection: str, rid: str) -> dict:
    with open(os.path.join(FIXTURES, collection, rid + ".json")) as f:
        return json.load(f)


def templates(collection: str) -> list[dict]:
    d = os.path.join(FIXTURES, collection)
    return [fixture(collection, n[:-5]) for n in sorted(os.listdir(d)) if n.endswith(".json")]


def write_record(root: str, collection: str, record: dict) -> None:
    with open(os.path.join(root, collection, record["id"] + ".json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def build_records(root: str, messages: int, parts_per_message: int, others: int,
                  other_messages: int) -> None:
    """The records dir: SESSION plus `others` sessions, records shaped like the fixtures."""
    for c in ("session", "message", "part", "sandbox", "setup"):
        os.makedirs(os.path.join(root, c), exist_ok=True)
    session_t = fixture("session", "ses_7f3a")
    message_ts = templates("message")
    part_ts = templates("part")
    write_record(root, "sandbox", fixture("sandbox", "sbx_19c"))
    write_record(root, "setup", fixture("setup", "setup_v3"))
    sessions = [(SESSION, messages)] + [(f"ses_{i:03d}", other_messages) for i in range(others)]
    for sid, count in sessions:
        s = dict(session_t, id=sid)
        s["lastMessageId"] = f"msg_{sid}_{count - 1:05d}"
        write_record(root, "session", s)
        for m in range(count):
            mid = f"msg_{sid}_{m:05d}"
            rec = dict(message_ts[m % len(message_ts)], id=mid, sessionId=sid)
            rec["createdAt"] = 1763700000000 + m * 1000
            write_record(root, "message", rec)
            # Parts are numbered across the session; index runs within the message, written in
            # reverse so that file order is not part order.
            for k in reversed(range(parts_per_message)):
                p = m * parts_per_message + k
                part = dict(part_ts[p % len(part_ts)], id=f"prt_{sid}_{p:06d}", sessionId=sid,
                            messageId=mid, index=k)
                write_record(root, "part", part)


# ------------------------------------------------------------- mounts ---

def mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


class Target:
    def __init__(self, name: str, root: str):
        self.name = name
        self.root = root            # the directory that holds `.meta`
        self.proc: subprocess.Popen | None = None
        self.logfile: str | None = None

    def teardown(self) -> None:
        pass


class Mount(Target):
    def __init__(self, name: str, base: str, binary: str, records: str):
        super().__init__(name, os.path.join(base, "mnt"))
        self.binary = binary
        self.base = base
        self.records = records
        self.logfile = os.path.join(base, "daemon.log")

    def setup(self, timeout: float) -> None:
        data = os.path.join(self.base, "data")
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(data, exist_ok=True)
        cmd = [self.binary, "mount", "--data-dir", data, "--session", SESSION,
               "--records-dir", self.records, self.root]
        log(f"[{self.name}] {' '.join(cmd)}")
        with open(self.logfile, "wb") as lf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=lf,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not mounted(self.root):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: mount failed; its output:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            with open(self.logfile, "rb") as f:
                return f.read().decode(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def teardown(self) -> None:
        if mounted(self.root):
            subprocess.run([self.binary, "unmount", self.root], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if not mounted(self.root):
                break
            time.sleep(0.1)
        if mounted(self.root):
            subprocess.run(["umount", "-l", self.root])
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log(f"[{self.name}] pid {self.proc.pid} did not exit; SIGKILL")
                self.proc.kill()
                self.proc.wait()
            self.proc = None


# ---------------------------------------------------------- workloads ---

def copy_meta(src: str, dst: str) -> None:
    """The mount's `.meta` as plain files (read through the mount: the same bytes)."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for n in filenames:
            with open(os.path.join(dirpath, n), "rb") as f:
                data = f.read()
            with open(os.path.join(dst, rel, n), "wb") as f:
                f.write(data)


def listing(out: bytes) -> list[tuple[str, str]]:
    """(name, size) of each entry of `ls -l` output."""
    rows = []
    for line in out.decode().splitlines()[1:]:
        fields = line.split()
        rows.append((fields[-1], fields[4]))
    return rows


def timed(fn):
    t0 = time.perf_counter_ns()
    out = fn()
    return (time.perf_counter_ns() - t0) / 1e9, out


def run_ls(t: Target) -> tuple[float, object]:
    d = os.path.join(t.root, ".meta", "messages")
    secs, r = timed(lambda: subprocess.run(["ls", "-l", d], stdout=subprocess.PIPE, check=True))
    return secs, listing(r.stdout)


def run_cat(t: Target) -> tuple[float, object]:
    f = os.path.join(t.root, ".meta", "history.json")
    secs, r = timed(lambda: subprocess.run(["cat", f], stdout=subprocess.PIPE, check=True))
    return secs, (len(r.stdout), hashlib.sha256(r.stdout).hexdigest())


def run_stat(t: Target, names: list[str]) -> tuple[float, object]:
    d = os.path.join(t.root, ".meta", "parts")
    paths = [os.path.join(d, n) for n in names]

    def loop():
        return sum(os.stat(p).st_size for p in paths)
    return timed(loop)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true",
                    help="1,000 messages and 5,000 parts among 10 other sessions")
    ap.add_argument("--roomfs-bin", action="append", default=[], metavar="NAME=PATH",
                    help="a roomfs binary to mount (repeatable); default target/release/roomfs")
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--json")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--mount-timeout", type=float, default=30)
    args = ap.parse_args()
    bins = []
    for spec in args.roomfs_bin or [f"roomfs={os.path.join(REPO, 'target/release/roomfs')}"]:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(spec), spec
        if not os.access(path, os.X_OK):
            log(f"error: {path} is not an executable roomfs binary")
            return 2
        bins.append((name, os.path.realpath(path)))
    messages, ppm, others, other_messages = (1000, 5, 10, 100) if args.quick else (10000, 5, 100, 100)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, on_signal)

    os.makedirs(args.workdir, exist_ok=True)
    work = os.path.realpath(tempfile.mkdtemp(prefix="roomfs-bench-meta-", dir=args.workdir))
    log(f"scratch dir: {work}")
    records = os.path.join(work, "records")
    mounts = [Mount(name, os.path.join(work, f"mount-{i}"), path, records)
              for i, (name, path) in enumerate(bins)]
    native = Target("native", os.path.join(work, "native"))
    targets: list[Target] = [native] + mounts
    times = {t.name: {w: [] for w, _ in WORKLOADS} for t in targets}
    failures: list[str] = []
    started = time.monotonic()
    rc = 0
    try:
        t0 = time.monotonic()
        build_records(records, messages, ppm, others, other_messages)
        log(f"records: {messages} messages, {messages * ppm} parts of {SESSION} among {others} "
            f"other sessions of {other_messages} messages ({time.monotonic() - t0:.0f} s)")
        for m in mounts:
            m.setup(args.mount_timeout)
        t0 = time.monotonic()
        copy_meta(os.path.join(mounts[0].root, ".meta"), os.path.join(native.root, ".meta"))
        log(f"native copy of .meta made through {mounts[0].name} ({time.monotonic() - t0:.0f} s)")
        parts = sorted(os.listdir(os.path.join(native.root, ".meta", "parts")))
        if len(parts) != messages * ppm:
            raise Mismatch(f"{len(parts)} parts in .meta/parts, expected {messages * ppm}")
        for rnd in range(args.rounds):
            log(f"round {rnd + 1}/{args.rounds}")
            for w, _ in WORKLOADS:
                expected = None
                for t in targets:
                    os.sync()
                    if w == "ls -l":
                        secs, seen = run_ls(t)
                    elif w == "cat":
                        secs, seen = run_cat(t)
                    else:
                        secs, seen = run_stat(t, parts)
                    if t is native:
                        expected = seen
                    elif seen != expected:
                        failures.append(f"round {rnd + 1}: {w} on {t.name} differs from native")
                    times[t.name][w].append(secs)
                    log(f"  {w:6s} {t.name:10s} {secs * 1000:9.1f} ms")
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); cleaning up")
        rc = 130
    except (Mismatch, RuntimeError) as e:
        log(f"error: {e}")
        rc = 1
    finally:
        for m in reversed(mounts):
            m.teardown()
        left = [m.root for m in mounts if mounted(m.root)]
        if left:
            log(f"ERROR: still mounted: {left}; not removing {work}")
            rc = rc or 3
        elif args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if rc:
        return rc

    rows = []
    summary = {}
    for w, what in WORKLOADS:
        nat = times["native"][w]
        row = [what, f"{statistics.median(nat) * 1000:.1f}"]
        summary[w] = {"native_ms": statistics.median(nat) * 1000}
        for m in mounts:
            ts = times[m.name][w]
            ratios = [a / b for a, b in zip(nat, ts)]
            row += [f"{statistics.median(ts) * 1000:.1f}", f"{statistics.median(ratios):.3f}",
                    f"{min(ratios):.3f}..{max(ratios):.3f}"]
            summary[w][m.name] = {"ms": statistics.median(ts) * 1000,
                                  "ratio": statistics.median(ratios),
                                  "spread": [min(ratios), max(ratios)]}
        rows.append(row)
    header = ["operation", "native ms"]
    for m in mounts:
        header += [f"{m.name} ms", "ratio", "spread"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    print(f"# {now} | kernel {os.uname().release} | {os.cpu_count()} CPUs | {args.rounds} rounds"
          f" | {messages} messages, {messages * ppm} parts among {others} other sessions"
          f" | {time.monotonic() - started:.0f} s")
    print("# times are medians over rounds; ratio = native time / roomfs time per round "
          "(median; spread = min..max); higher is better, 1.0 is native")
    for r in [header] + rows:
        print("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                        for i, c in enumerate(r)))
    for f in failures:
        print(f"FAIL {f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": now, "rounds": args.rounds, "messages": messages,
                       "parts": messages * ppm, "other_sessions": others,
                       "workloads": summary, "failures": failures}, f, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
