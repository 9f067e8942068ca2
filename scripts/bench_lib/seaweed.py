"""A SeaweedFS (`weed mini`) of the benchmark's own, started and stopped by pid.

The same process setup as the tests' harness (tests/common/s3.rs), for the same reasons:
- bound to 127.0.0.1, every listener on a port picked free by the kernel (weed moves a taken
  default port silently, and fails on a taken explicit one, so all are explicit); the admin
  gRPC port is admin + 10000, where weed 4.48's built-in worker dials it whatever the flag says;
- environment cleared but PATH, HOME is the temp dir (weed reads ~/.seaweedfs/*.toml), and the
  two AWS credential variables, from which weed makes its one identity: requests must then be
  signed with that key (with no identity it would take anything, signed or not);
- logs to our file (-logtostderr), local sockets in the temp dir; the gRPC unix sockets weed
  always puts in /tmp under their port numbers are removed at stop;
- ready when S3 answers, the bucket exists in the filer and a canary written through the filer
  reads back (an open S3 port alone is not ready).
The process gets PR_SET_PDEATHSIG(SIGKILL), so it dies with the benchmark even if that is
killed with SIGKILL and has no chance to stop it.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import signal
import socket
import subprocess
import time

ACCESS_KEY = "roomfs-bench-access-key"
SECRET_KEY = "roomfs-bench-secret-key-7c4a8d09ca3762af"
REGION = "us-east-1"
BUCKET = "roomfs-bench"
CANARY_PATH = "/roomfs-bench/canary"  # through the filer, outside /buckets: no S3 listing shows it


def tools_venv() -> str:
    """$ROOMFS_TEST_CACHE/venv, by default ~/.cache/roomfs-test/venv (as scripts/setup)."""
    cache = os.environ.get("ROOMFS_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "roomfs-test")
    return os.path.join(cache, "venv")


def venv_bin(name: str) -> str:
    return os.path.join(tools_venv(), "bin", name)


def _hold_free_port(held: list) -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    held.append(s)
    return s.getsockname()[1]


def free_port() -> int:
    held: list = []
    try:
        return _hold_free_port(held)
    finally:
        for s in held:
            s.close()


def _pick_ports() -> dict:
    held: list = []
    try:
        p = {k: _hold_free_port(held) for k in
             ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")}
        while True:
            a = _hold_free_port(held)
            if a + 10000 > 65535:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", a + 10000))
            except OSError:
                s.close()
                continue
            held.append(s)
            p["admin"], p["admin_grpc"] = a, a + 10000
            return p
    finally:
        for s in held:
            s.close()


def die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def _http(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request(method, path, body=body)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


class SeaweedFs:
    def __init__(self, base: str, weed: str | None = None, log=print):
        self.base = base
        self.data = os.path.join(base, "data")
        self.logfile = os.path.join(base, "weed.log")
        self.weed = weed or os.environ.get("ROOMFS_WEED") or venv_bin("weed")
        self.proc: subprocess.Popen | None = None
        self.ports: dict = {}
        self.log = log

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict:
        """The variables by which AWS tools find this endpoint and its credentials, and none
        of the user's own AWS configuration."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, timeout: float = 60) -> None:
        if not os.access(self.weed, os.X_OK):
            raise RuntimeError(f"SeaweedFS: {self.weed} is missing: run scripts/setup (or set ROOMFS_WEED)")
        os.makedirs(self.data, exist_ok=True)
        for attempt in range(1, 4):
            self.ports = _pick_ports()
            self._spawn()
            err = self._wait_ready(timeout)
            if err is None:
                grpc = " ".join(f"{k[:-5]}={v}" for k, v in self.ports.items() if k.endswith("_grpc"))
                self.log(f"[seaweedfs] weed mini pid {self.proc.pid} ready at {self.endpoint} "
                         f"(bucket {BUCKET}, data in {self.data}; gRPC ports {grpc})")
                return
            taken = "not available" in self.log_tail(200)
            self.stop()
            if taken and attempt < 3:
                self.log("[seaweedfs] a port was taken meanwhile; trying new ports")
                continue
            raise RuntimeError(f"SeaweedFS did not start: {err}; its log:\n{self.log_tail()}")

    def _spawn(self) -> None:
        p = self.ports
        b = self.base
        cmd = [self.weed, "-logtostderr", "mini", f"-dir={self.data}", f"-bucket={BUCKET}",
               "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
               f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
               f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
               f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
               f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}",
               f"-filer.localSocket={b}/filer.sock", f"-s3.localSocket={b}/s3.sock",
               "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.telemetry=false"]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": b,
               "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with open(self.logfile, "ab") as lf:
            self.proc = subprocess.Popen(cmd, cwd=b, env=env, stdin=subprocess.DEVNULL, stdout=lf,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=die_with_parent)

    def _wait_ready(self, timeout: float) -> str | None:
        canary = f"roomfs-bench canary {self.base}".encode()
        deadline = time.monotonic() + timeout
        wrote = False
        last = "not tried"
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                time.sleep(0.05)
                return f"weed exited with status {rc}"
            try:
                _http(self.ports["s3"], "GET", "/")
                st, _ = _http(self.ports["filer"], "GET", f"/buckets/{BUCKET}/")
                if st != 200:
                    raise OSError(f"bucket: HTTP {st}")
                if not wrote:
                    st, body = _http(self.ports["filer"], "PUT", CANARY_PATH, canary)
                    if st != 201:
                        raise OSError(f"canary PUT: HTTP {st} {body[:200]!r}")
                    wrote = True
                st, body = _http(self.ports["filer"], "GET", CANARY_PATH)
                if st != 200 or body != canary:
                    raise OSError(f"canary GET: HTTP {st}")
                return None
            except (OSError, http.client.HTTPException) as e:
                last = str(e)
            time.sleep(0.05)
        return f"not ready after {timeout:g} s ({last})"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGKILL by pid (its data is thrown away with the scratch dir), then its /tmp sockets."""
        p, self.proc = self.proc, None
        if p is not None:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
            self.log(f"[seaweedfs] stopped pid {p.pid}")
        for svc in ("master", "volume", "filer", "s3", "admin"):
            port = self.ports.get(f"{svc}_grpc")
            if port:
                try:
                    os.unlink(f"/tmp/seaweedfs-{svc}-grpc-{port}.sock")
                except OSError:
                    pass

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.logfile, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
            return "\n".join("    " + line for line in lines[-n:]) or "    (no output)"
        except OSError:
            return "    (no log)"


def main(argv: list[str]) -> int:
    """`python3 scripts/bench_lib/seaweed.py -- COMMAND...`: runs COMMAND with a SeaweedFS of
    its own (in a temporary directory), whose endpoint and credentials are in COMMAND's
    environment (AWS_*, and ROOMFS_SEAWEED_BUCKET), and stops it after; COMMAND's status."""
    import shutil
    import sys
    import tempfile

    if len(argv) < 2 or argv[0] != "--":
        print("usage: seaweed.py -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    base = tempfile.mkdtemp(prefix="roomfs-seaweed-", dir="/var/tmp")
    sw = SeaweedFs(base, log=lambda m: print(m, file=sys.stderr))
    try:
        sw.start()
        env = {**os.environ, **sw.env(), "ROOMFS_SEAWEED_BUCKET": BUCKET}
        return subprocess.run(argv[1:], env=env).returncode
    except RuntimeError as e:
        print(f"seaweed.py: {e}", file=sys.stderr)
        return 1
    finally:
        sw.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
