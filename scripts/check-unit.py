"""The checks of scripts/check-unit, run as root inside the nested systemd's namespaces.

roomfs.service has just been started. This drives its daemon through `roomfs` CLI calls and its
mounts, as an agent host does, with the agent a non-root uid, and checks both that each
hardening setting of the unit is in effect and that the daemon still does everything it must
under it. Each check names the setting or capability it guards. The first failure ends the run
with a message and exit status 1.
"""

import errno
import os
import pickle
import resource
import stat
import subprocess
import sys
import time

BIN = os.environ["ROOMFS_BIN"]
TMP = os.environ["ROOMFS_CHECK_DIR"]
DATA = "/var/lib/roomfs"
UNIT = "roomfs.service"
AGENT = 12345  # the agent's uid and gid: no passwd entry needed
MIB = 1 << 20

# capability(7) numbers, in order.
CAPS = """chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap
linux_immutable net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner sys_module
sys_rawio sys_chroot sys_ptrace sys_pacct sys_admin sys_boot sys_nice sys_resource sys_time
sys_tty_config mknod lease audit_write audit_control setfcap mac_override mac_admin syslog
wake_alarm block_suspend audit_read perfmon bpf checkpoint_restore""".split()


class Failed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failed(what)


def ok(what):
    print(f"check-unit: ok: {what}", file=sys.stderr)


def run(*args):
    """Runs a command; returns its stdout, or fails with its output."""
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        raise Failed(f"{' '.join(args)} exited {p.returncode}: {p.stderr.strip()} {p.stdout.strip()}")
    return p.stdout


def roomfs(*args):
    return run(BIN, *args)


def prop(name):
    return run("systemctl", "show", "-p", name, "--value", UNIT).strip()


def status_field(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == field:
                return value.strip()
    raise Failed(f"/proc/{pid}/status has no {field}")


def cap_names(hex_mask):
    mask = int(hex_mask, 16)
    return {name for i, name in enumerate(CAPS) if mask >> i & 1}


def as_agent(fn, *args):
    """Runs `fn(*args)` in a child process as the agent (uid and gid AGENT, no groups); returns
    its result or raises the exception it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(AGENT, AGENT, AGENT)
            os.setresuid(AGENT, AGENT, AGENT)
            result = (True, fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the parent
            result = (False, e)
        with os.fdopen(w, "wb") as out:
            pickle.dump(result, out)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    fine, value = pickle.loads(data)
    if not fine:
        raise value
    return value


def mountinfo(pid):
    """Mount point -> fstype of the mounts in the namespace of `pid`."""
    mounts = {}
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mounts[left.split()[4]] = right.split()[0]
    return mounts


def wait_for(cond, what, seconds=20):
    deadline = time.monotonic() + seconds
    while not cond():
        check(time.monotonic() < deadline, what)
        time.sleep(0.05)


def mount_point(name):
    path = os.path.join(TMP, "mnt", name)
    os.makedirs(path)
    os.chown(path, AGENT, AGENT)  # a new space belongs to the mount point's owner
    return path


def write(path, data, mode=0o644):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def disk(rel):
    return os.path.join(DATA, rel)


def check_service(pid):
    check(prop("ActiveState") == "active" and prop("SubState") == "running",
          f"{UNIT} is {prop('ActiveState')}/{prop('SubState')}")
    check(os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/1/ns/mnt"),
          "the daemon has a mount namespace of its own: its FUSE mounts would not reach the "
          "host's (some setting implies a namespace; see the unit's comments)")
    ok("the daemon runs in systemd's (the host's) mount namespace")

    want = set(prop("CapabilityBoundingSet").replace("cap_", "").split())
    have_pid1 = cap_names(status_field(1, "CapBnd"))
    bounding = cap_names(status_field(pid, "CapBnd"))
    effective = cap_names(status_field(pid, "CapEff"))
    check(bounding == want & have_pid1,
          f"CapabilityBoundingSet: the daemon's bounding set is {sorted(bounding)}, "
          f"the unit asks {sorted(want)}")
    check(effective == bounding and status_field(pid, "CapAmb") == "0000000000000000",
          f"the daemon's effective capabilities {sorted(effective)} are not its bounding set")
    ok(f"capabilities: {' '.join(sorted(effective))}")

    check(status_field(pid, "NoNewPrivs") == "1", "NoNewPrivileges=yes is not in effect")
    check(status_field(pid, "Seccomp") == "2", "the daemon runs without a seccomp filter")
    ok(f"NoNewPrivileges, {status_field(pid, 'Seccomp_filters')} seccomp filters")

    soft_wanted = int(prop("LimitNOFILESoft"))
    with open("/proc/1/limits") as f:
        pid1_hard = next(int(l.split()[4]) for l in f if l.startswith("Max open files"))
    with open(f"/proc/{pid}/limits") as f:
        soft = next(int(l.split()[3]) for l in f if l.startswith("Max open files"))
    # systemd lowers what it cannot grant to its own hard limit.
    check(soft == min(soft_wanted, pid1_hard),
          f"LimitNOFILE: the daemon may open {soft} files, the unit asks {soft_wanted}")
    ok(f"open files limit {soft} (the unit asks {soft_wanted}, systemd may grant {pid1_hard})")

    fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    if os.path.exists("/dev/cpu_dma_latency"):
        check("/dev/cpu_dma_latency" in fds,
              "the daemon could not open /dev/cpu_dma_latency (DeviceAllow=): it spins instead")
        ok("the daemon holds /dev/cpu_dma_latency (adaptive low latency)")

    # The device policy: a process in the service's cgroup may open /dev/fuse but not a device
    # the unit does not allow (the probe has no driver: ENXIO where it may be opened).
    policy = prop("DevicePolicy")
    cgroup = "/sys/fs/cgroup" + prop("ControlGroup")

    def in_service_cgroup():
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        results = {}
        for dev in ["/dev/fuse", "/dev/roomfs-check-probe"]:
            try:
                os.close(os.open(dev, os.O_RDWR))
                results[dev] = 0
            except OSError as e:
                results[dev] = e.errno
        return results

    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(r)
            os.write(w, pickle.dumps(in_service_cgroup()))
        finally:
            os._exit(0)
    os.close(w)
    answer = os.read(r, 4096)
    os.waitpid(child, 0)
    check(answer, "a process could not join the service's cgroup")
    results = pickle.loads(answer)
    # DevicePolicy=auto restricts too once there is a DeviceAllow= line.
    restricted = policy != "auto" or prop("DeviceAllow") != ""
    probe = errno.EPERM if restricted else errno.ENXIO
    check(results["/dev/fuse"] == 0, f"DeviceAllow=: /dev/fuse cannot be opened: {results}")
    check(results["/dev/roomfs-check-probe"] == probe,
          f"DevicePolicy={policy}: opening a device outside the policy gave "
          f"{errno.errorcode.get(results['/dev/roomfs-check-probe'], 'success')}")
    ok(f"DevicePolicy={policy}: /dev/fuse opens, other devices "
       f"{'are refused' if probe == errno.EPERM else 'are not restricted'}")


def check_room():
    mnt = mount_point("r1")
    roomfs("mount", "--daemon", "--room", "r1", mnt)
    check(mountinfo(1).get(mnt, "").startswith("fuse"),
          f"the mount at {mnt} is not in systemd's mount namespace")
    ok("a room mounted through the API is visible in systemd's mount namespace")
    p = lambda name: os.path.join(mnt, name)  # noqa: E731
    mode = stat.S_IMODE(os.stat(mnt).st_mode)
    check(mode == 0o755, f"UMask: a new room's directory has mode {mode:o}, not 755")

    as_agent(write, p("hello.txt"), b"hello\n")
    st = os.stat(disk("rooms/r1/hello.txt"))
    check((st.st_uid, st.st_gid) == (AGENT, AGENT),
          f"CAP_CHOWN: a new file belongs to {st.st_uid}:{st.st_gid}, not the agent")
    ok("CAP_CHOWN: new files belong to the agent on disk")

    def private():
        os.mkdir(p("private"), 0o700)
        write(p("private/secret"), b"s3cret", 0o600)
        return read(p("private/secret"))

    check(as_agent(private) == b"s3cret", "reading back an agent's 0600 file")
    ok("CAP_DAC_OVERRIDE: the daemon reads and writes agents' 0600 files in 0700 directories")

    def modes():
        os.chmod(p("private/secret"), 0o640)
        os.mkdir(p("shared"), 0o755)
        os.chmod(p("shared"), 0o2775)
        os.utime(p("hello.txt"), (1_000_000_000, 1_000_000_000))
        return os.stat(p("shared")).st_mode & 0o7777

    check(as_agent(modes) == 0o2775, "CAP_FSETID: chmod g+s through the mount dropped the bit")
    check(os.stat(disk("rooms/r1/private/secret")).st_mode & 0o7777 == 0o640,
          "CAP_FOWNER: chmod of an agent's file did not reach the disk")
    check(os.stat(disk("rooms/r1/shared")).st_mode & 0o7777 == 0o2775,
          "CAP_FSETID: the setgid bit of the agent's group was dropped on disk")
    check(os.stat(disk("rooms/r1/hello.txt")).st_mtime == 1_000_000_000,
          "CAP_FOWNER: setting an agent's file's times did not reach the disk")
    ok("CAP_FOWNER, CAP_FSETID: chmod (setgid kept) and utimes of agents' files")

    def append():
        with open(p("hello.txt"), "ab") as f:
            f.write(b"more\n")
        return read(p("hello.txt"))

    check(as_agent(append) == b"hello\nmore\n", "an append")
    ok("appends committed in place (flock, marker linked through /proc/self/fd)")

    # Passthrough: the kernel reads a large file from its backing file, registered with an
    # ioctl on /dev/fuse that needs CAP_SYS_ADMIN.
    as_agent(write, p("big"), b"a" * (2 * MIB))
    with open(p("big"), "rb") as f:
        first = os.pread(f.fileno(), 4, 0)
        fd = os.open(disk("rooms/r1/big"), os.O_WRONLY)
        os.pwrite(fd, b"DISK", 0)
        os.close(fd)
        second = os.pread(f.fileno(), 4, 0)
    check(first == b"aaaa", "the first read of a large file")
    if "the kernel does not offer FUSE passthrough" in journal():
        print("check-unit: not checked: passthrough (this kernel has none)", file=sys.stderr)
    else:
        check(second == b"DISK",
              "FUSE passthrough is off: the second read came from the page cache, not the disk "
              "(registering backing files needs CAP_SYS_ADMIN and ioctl)")
        ok("FUSE passthrough registers backing files")

    def large_files():
        write(p("db"), b"d" * (8 * MIB))
        fd = os.open(p("db"), os.O_RDWR)  # alone on the file: a patch of the written block
        os.pwrite(fd, b"PATCH", 5 * MIB)
        os.fsync(fd)  # a durable commit
        os.close(fd)
        # A writer while another handle reads: its working copy is seeded by an idle-priority
        # (SCHED_IDLE) thread and swapped in whole; the reader (holding an OFD lock) keeps its
        # version.
        reader = os.open(p("db"), os.O_RDONLY)
        fd = os.open(p("db"), os.O_WRONLY)
        os.pwrite(fd, b"AGAIN", 6 * MIB)
        os.close(fd)
        kept = os.pread(reader, 5, 6 * MIB)
        os.close(reader)
        fd = os.open(p("alloc"), os.O_RDWR | os.O_CREAT, 0o644)
        os.posix_fallocate(fd, 0, 3 * MIB)
        os.close(fd)
        fd = os.open(p("sparse"), os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"s" * (4 * MIB))
        os.ftruncate(fd, 8 * MIB)
        os.close(fd)
        fd = os.open(p("sparse"), os.O_RDONLY)
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        os.close(fd)
        src = os.open(p("db"), os.O_RDONLY)
        dst = os.open(p("copy"), os.O_WRONLY | os.O_CREAT, 0o644)
        copied = 0
        while copied < 8 * MIB:
            n = os.copy_file_range(src, dst, 8 * MIB - copied)
            if n == 0:
                break
            copied += n
        os.close(dst)
        os.close(src)
        os.rename(p("copy"), p("copy2"))
        os.symlink("copy2", p("link"))
        os.mkfifo(p("fifo"))
        data = read(p("link"))
        return kept, copied, hole, data[5 * MIB:5 * MIB + 5] + data[6 * MIB:6 * MIB + 5]

    kept, copied, hole, changed = as_agent(large_files)
    check(kept == b"ddddd", "a reader did not keep its version while a copy was committed")
    check(copied == 8 * MIB, f"copy_file_range copied {copied} bytes")
    check(hole == 4 * MIB, f"SEEK_HOLE found {hole}, not the hole at 4 MiB")
    check(changed == b"PATCHAGAIN", "a patch and a copy, read through a renamed copy and a link")
    with open(disk("rooms/r1/db"), "rb") as f:
        f.seek(5 * MIB)
        check(f.read(5) == b"PATCH", "the patch did not reach the disk")
    check(os.stat(disk("rooms/r1/alloc")).st_size == 3 * MIB, "fallocate")
    check(stat.S_ISFIFO(os.lstat(disk("rooms/r1/fifo")).st_mode), "mkfifo")
    ok("patches, fsync, copies under readers, fallocate, SEEK_HOLE, copy_file_range, rename, "
       "symlink, mkfifo")

    # Hard links and extended attributes, where this version of the daemon has them (it
    # answers EPERM and EOPNOTSUPP by design where not; a refusal by the sandbox would show as
    # a failed system call with --strace).
    def links_and_xattrs():
        try:
            os.link(p("copy2"), p("hard"))
            with open(p("hard"), "r+b") as f:
                f.write(b"HARD")
            st, other = os.stat(p("hard")), os.stat(p("copy2"))
            linked = (st.st_ino == other.st_ino and st.st_nlink == 2
                      and read(p("copy2"))[:4] == b"HARD")
        except PermissionError:
            linked = None
        try:
            os.setxattr(p("hello.txt"), "user.roomfs-check", b"v")
            xattr = os.getxattr(p("hello.txt"), "user.roomfs-check") == b"v"
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            xattr = None
        return linked, xattr

    linked, xattr = as_agent(links_and_xattrs)
    check(linked is not False, "a hard link does not show one file under both names")
    check(xattr is not False, "an extended attribute did not read back")
    ok(f"hard links {'refused by this version' if linked is None else 'work'}, extended "
       f"attributes {'refused by this version' if xattr is None else 'work'}")

    def many_open(count):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        os.mkdir(p("many"))
        for i in range(count):
            write(p(f"many/{i}"), b"x")
        fds = [os.open(p(f"many/{i}"), os.O_RDONLY) for i in range(count)]
        seen = sum(len(os.pread(fd, 1, 0)) for fd in fds)
        for fd in fds:
            os.close(fd)
        return seen

    # More files than the default soft limit of services (1024); the agent inherits our hard limit.
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] >= 1600:
        check(as_agent(many_open, 1500) == 1500, "1500 files open at once")
        ok("LimitNOFILE: 1500 files of a mount open at once")
    else:
        print("check-unit: not checked: 1500 open files (our own limit is lower)", file=sys.stderr)
    return mnt


def check_session(room_mnt):
    roomfs("session", "create", "s1")
    mnt = mount_point("s1")
    roomfs("mount", "--daemon", "--session", "s1", mnt)

    def work():
        os.mkdir(os.path.join(mnt, "outputs"))
        write(os.path.join(mnt, "outputs/report.txt"), b"report\n")
        return sorted(os.listdir(mnt))

    # A session made by `session create` belongs to the daemon's user (root), not an agent.
    check("outputs" in work(), "a session mount")
    roomfs("session", "end", "s1", "--export", "outputs/", "--to-room", "r1")
    check(read(os.path.join(room_mnt, "outputs/report.txt")) == b"report\n",
          "the export did not reach the room")
    check(not os.path.exists(disk("sessions/s1")), "the session's files were not deleted")
    check(mnt not in mountinfo(1), "the session's mount was not removed")
    ok("a session: created, mounted, written, exported to a room and ended")

    roomfs("records", "call", '{"method":"session.set","id":"ses_x","value":{"id":"ses_x"}}')
    got = roomfs("records", "call", '{"method":"session.get","id":"ses_x"}')
    check("ses_x" in got, f"records: got {got!r}")
    ok("records stored and read back")
    roomfs("unmount", room_mnt)
    check(room_mnt not in mountinfo(1), "roomfs unmount left the mount")
    ok("roomfs unmount")


def check_stop():
    """A stop with a mount and a file open for writing: committed, unmounted, clean exit."""
    mnt = mount_point("r2")
    roomfs("mount", "--daemon", "--room", "r2", mnt)
    started_r, started_w = os.pipe()
    go_r, go_w = os.pipe()
    writer = os.fork()
    if writer == 0:
        try:
            os.setgroups([])
            os.setresgid(AGENT, AGENT, AGENT)
            os.setresuid(AGENT, AGENT, AGENT)
            fd = os.open(os.path.join(mnt, "open.txt"), os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"pending\n")
            os.write(started_w, b"x")
            os.read(go_r, 1)
            os.close(fd)  # the daemon waits for the detached mount's last open file
        finally:
            os._exit(0)
    os.close(started_w)
    check(os.read(started_r, 1) == b"x", "the writer did not start")
    run("systemctl", "stop", "--no-block", UNIT)
    wait_for(lambda: mnt not in mountinfo(1), "the stop did not remove the mount")
    check(read(disk("rooms/r2/open.txt")) == b"pending\n", "the stop did not commit open files")
    os.write(go_w, b"x")
    os.waitpid(writer, 0)
    wait_for(lambda: prop("ActiveState") == "inactive", "the daemon did not stop")
    check(prop("Result") == "success" and prop("ExecMainStatus") == "0",
          f"the stop: result {prop('Result')}, exit status {prop('ExecMainStatus')}")
    ok("systemctl stop: open files committed, mounts removed, clean exit")


def journal():
    return run("journalctl", "-u", UNIT, "-o", "cat", "--no-pager")


def check_journal():
    bad = [line for line in journal().splitlines()
           if " WARN " in line or " ERROR " in line or "roomfs: error" in line
           or "ermission denied" in line or "not permitted" in line]
    # What check_stop asks for: a stop while a file is open detaches the mount lazily. And fuser
    # reports a reply the kernel no longer waits for (its request went with an unmount or an
    # interrupted caller), which strace's slowness makes likely; nothing is refused there.
    bad = [line for line in bad if "detaching lazily" not in line
           and "Failed to send FUSE reply: No such file or directory" not in line]
    check(not bad, "the daemon logged problems:\n" + "\n".join(bad))
    ok("no warning or error in the daemon's log")


# What the unit's sandbox must refuse, tried by a probe service with the same settings (every
# line of the unit but how it starts and its directories). Each entry: what is tried, the
# setting that refuses it, the errno expected. Nothing here can harm the host even if allowed:
# the calls change nothing or only the probe itself.
PROBE = r"""
import ctypes, errno, mmap, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)

def c(fn, *args):  # the errno of a libc call, 0 on success
    ctypes.set_errno(0)
    return 0 if fn(*args) >= 0 else ctypes.get_errno()

def attempt(fn):
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno

def sock(family, kind):
    return lambda: socket.socket(family, kind).close()

class Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint), ("rest", ctypes.c_byte * 204)]

def tcp():  # what an S3 client does: resolve a name (glibc asks netlink, refused) and connect
    found = socket.getaddrinfo("localhost", 0, 0, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)
    host = next(a[4][0] for a in found if a[0] == socket.AF_INET)
    with socket.create_server((host, 0)) as server:
        socket.create_connection(server.getsockname()).close()

name = os.uname().nodename.encode()
results = {
    "getaddrinfo+connect(AF_INET)": attempt(tcp),
    "socket(AF_UNIX)": attempt(sock(socket.AF_UNIX, socket.SOCK_STREAM)),
    "socket(AF_INET)": attempt(sock(socket.AF_INET, socket.SOCK_STREAM)),
    "socket(AF_INET6)": attempt(sock(socket.AF_INET6, socket.SOCK_STREAM)),
    "socket(AF_NETLINK)": attempt(sock(socket.AF_NETLINK, socket.SOCK_RAW)),
    "socket(AF_PACKET)": attempt(sock(socket.AF_PACKET, socket.SOCK_RAW)),
    "unshare(CLONE_NEWUSER)": c(libc.unshare, 0x10000000),
    "unshare(CLONE_NEWNS)": c(libc.unshare, 0x00020000),
    "sched_setscheduler(SCHED_FIFO)":
        attempt(lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))),
    "sched_setscheduler(SCHED_IDLE)":
        attempt(lambda: os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))),
    "personality(PER_LINUX32)": c(libc.syscall, 135, 0x0008),
    "mmap(PROT_WRITE|PROT_EXEC)": attempt(lambda: mmap.mmap(
        -1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)),
    "adjtimex(read)": c(libc.adjtimex, ctypes.byref(Timex())),
    "sethostname(same name)": c(libc.sethostname, name, len(name)),
    "setuid(0)": attempt(lambda: os.setuid(0)),
    "keyctl(GET_KEYRING_ID)": c(libc.syscall, 250, 0, -3, 0),
    "syslog(SIZE_BUFFER)": c(libc.syscall, 103, 10, None, 0),
    "bpf(MAP_CREATE, NULL)": c(libc.syscall, 321, 0, None, 0),
    "ptrace(TRACEME)": c(libc.syscall, 101, 0, 0, 0, 0),
    "chroot(/)": attempt(lambda: os.chroot("/")),
}
for what, err in results.items():
    print(f"{what}={errno.errorcode.get(err, 'ok') if err else 'ok'}")
print("uts=" + os.readlink("/proc/self/ns/uts"))
"""

REFUSALS = {
    "getaddrinfo+connect(AF_INET)": ("ok", "RestrictAddressFamilies (S3 without AF_NETLINK)"),
    "socket(AF_UNIX)": ("ok", "RestrictAddressFamilies (the control socket)"),
    "socket(AF_INET)": ("ok", "RestrictAddressFamilies (S3, HTTP)"),
    "socket(AF_INET6)": ("ok", "RestrictAddressFamilies (S3, HTTP)"),
    "socket(AF_NETLINK)": ("EAFNOSUPPORT", "RestrictAddressFamilies"),
    "socket(AF_PACKET)": ("EAFNOSUPPORT", "RestrictAddressFamilies"),
    "unshare(CLONE_NEWUSER)": ("EPERM", "RestrictNamespaces"),
    "unshare(CLONE_NEWNS)": ("EPERM", "RestrictNamespaces"),
    "sched_setscheduler(SCHED_FIFO)": ("EPERM", "RestrictRealtime"),
    "sched_setscheduler(SCHED_IDLE)": ("ok", "RestrictRealtime (idle threads)"),
    "personality(PER_LINUX32)": ("EPERM", "LockPersonality"),
    "mmap(PROT_WRITE|PROT_EXEC)": ("EPERM", "MemoryDenyWriteExecute"),
    "adjtimex(read)": ("EPERM", "ProtectClock"),
    "sethostname(same name)": ("EPERM", "ProtectHostname"),
    "setuid(0)": ("EPERM", "SystemCallFilter=~@setuid"),
    "keyctl(GET_KEYRING_ID)": ("EPERM", "SystemCallFilter=~@keyring"),
    "syslog(SIZE_BUFFER)": ("EPERM", "SystemCallFilter (what ProtectKernelLogs filters)"),
    "bpf(MAP_CREATE, NULL)": ("EPERM", "SystemCallFilter (@privileged)"),
    "ptrace(TRACEME)": ("EPERM", "SystemCallFilter (@debug)"),
    "chroot(/)": ("EPERM", "SystemCallFilter (mount and umount2 only of @mount)"),
}


def check_refusals():
    """Runs PROBE as a service with the unit's sandbox and compares with REFUSALS."""
    probe = os.path.join(TMP, "probe.py")
    with open(probe, "w") as f:
        f.write(PROBE)
    skip = ("ExecStart=", "Type=", "Restart", "StateDirectory", "RuntimeDirectory")
    with open(os.path.join(TMP, "units", UNIT)) as f:
        lines = [line for line in f.read().splitlines() if not line.startswith(skip)]
    at = lines.index("[Service]") + 1
    lines[at:at] = ["Type=oneshot", f"ExecStart={sys.executable} {probe}"]
    with open(os.path.join(TMP, "units", "roomfs-probe.service"), "w") as f:
        f.write("\n".join(lines) + "\n")
    run("systemctl", "daemon-reload")
    run("systemctl", "start", "roomfs-probe.service")
    out = run("journalctl", "-u", "roomfs-probe.service", "-o", "cat", "--no-pager")
    got = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    wrong = [f"{what}: {got.get(what, 'not tried')}, expected {want} ({setting})"
             for what, (want, setting) in REFUSALS.items() if got.get(what) != want]
    if got.get("uts") == os.readlink("/proc/1/ns/uts"):
        wrong.append("the probe shares the host's UTS namespace (ProtectHostname)")
    check(not wrong, "the sandbox does not refuse what it should:\n  " + "\n  ".join(wrong))
    ok(f"a probe with the unit's sandbox is refused {sum(w != 'ok' for w, _ in REFUSALS.values())}"
       " things the daemon never does")


def main():
    pid = int(prop("MainPID"))
    check(pid > 0, f"{UNIT} has no main process")
    try:
        check_service(pid)
        room = check_room()
        check_session(room)
        check_stop()
        check_journal()
        check_refusals()
    except (Failed, OSError) as e:
        print(f"check-unit: FAILED: {e}", file=sys.stderr)
        sys.exit(1)


main()
