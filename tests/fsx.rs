//! fsx-style random operations (after xfstests' `fsx`) on one file through a real mount, checked
//! byte for byte against an in-memory model of the file.
//!
//! The operations are `pwrite`, `pread`, `ftruncate`, `fallocate` (growing, keeping the size,
//! punching holes, zeroing ranges), `copy_file_range` from another file of the mount, `fstat`,
//! reads and writes through shared mappings, `fsync`/`fdatasync`, close and reopen, reopen with `O_TRUNC`, a second read-write
//! descriptor that shares the first one's working copy for a while, and (rarely, it takes a
//! second) waiting out the kernel's attribute cache before looking the path up again. Every
//! commit point (a close, an `fsync`) is followed by a fresh read of the file through the mount
//! and of the committed file in the data dir; between them, fresh readers must see the last
//! committed version only.
//!
//! The run is seeded; a failure names the seed, the operation and the operations before it.
//! Reproduce or explore with `ROOMFS_FSX_SEED` (decimal or `0x` hex), `ROOMFS_FSX_OPS`,
//! `ROOMFS_FSX_MAXLEN` (the largest file size, bytes), `ROOMFS_FSX_CACHE_TTL` (the mount's
//! `--cache-ttl`, seconds) and `ROOMFS_FSX_VERBOSE=1` (print each operation), e.g.
//! `ROOMFS_FSX_SEED=0x1234 cargo test --test fsx -- --nocapture`.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::Mounted;

const NAME: &str = "fsx.bin";
/// The file `copy_file_range` copies from.
const SOURCE: &str = "fsx-source.bin";
const DEFAULT_SEED: u64 = 0x0f5c_2024_5eed;
const DEFAULT_OPS: u64 = 3000;
// Up to 2 MiB: about half the time at least the 1 MiB that passthrough readers need.
const DEFAULT_MAX_LEN: u64 = 2 << 20;
/// The longest single read or write.
const MAX_IO: u64 = 64 << 10;
/// Longer than the mount's attribute and entry cache time (`--cache-ttl`, 1 s by default).
const CACHE_EXPIRY: Duration = Duration::from_millis(1100);

/// What to print if touching a mapping raises SIGBUS (which would kill the test without a
/// word): the operation under way and the context to reproduce it.
static SIGBUS_NOTE: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// The mount point, detached by the SIGBUS handler (the dying test cannot unmount on drop).
static SIGBUS_UNMOUNT: Mutex<Option<std::ffi::CString>> = Mutex::new(None);

extern "C" fn on_sigbus(_: libc::c_int) {
    if let Ok(note) = SIGBUS_NOTE.try_lock() {
        // SAFETY: writing a buffer that stays alive (the lock is held) to stderr.
        unsafe { libc::write(2, note.as_ptr().cast(), note.len()) };
    }
    if let Ok(mnt) = SIGBUS_UNMOUNT.try_lock()
        && let Some(mnt) = mnt.as_ref()
    {
        // SAFETY: a system call on a path that stays alive (the lock is held).
        unsafe { libc::umount2(mnt.as_ptr(), libc::MNT_DETACH) };
    }
    // Back to the default action: the faulting access runs again and ends the process.
    // SAFETY: resetting a signal disposition.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

#[test]
fn random_operations_keep_every_byte() {
    let seed = env_u64("ROOMFS_FSX_SEED").unwrap_or(DEFAULT_SEED);
    let ops = env_u64("ROOMFS_FSX_OPS").unwrap_or(DEFAULT_OPS);
    let max_len = env_u64("ROOMFS_FSX_MAXLEN").unwrap_or(DEFAULT_MAX_LEN);
    assert!(
        max_len >= MAX_IO,
        "ROOMFS_FSX_MAXLEN must be at least {MAX_IO}"
    );
    let verbose = std::env::var_os("ROOMFS_FSX_VERBOSE").is_some_and(|v| v != "0");
    let started = Instant::now();
    // SAFETY: installs a handler that only writes a prepared message and resets itself.
    unsafe { libc::signal(libc::SIGBUS, on_sigbus as *const () as libc::sighandler_t) };

    let mut m = match std::env::var("ROOMFS_FSX_CACHE_TTL") {
        Ok(ttl) => Mounted::with_args(&["--room", "r1", "--cache-ttl", &ttl]),
        Err(_) => Mounted::room(),
    };
    *SIGBUS_UNMOUNT.lock().unwrap() = Some(common::cstr(&m.mnt));
    let mut fsx = Fsx::new(&m, seed, ops, max_len, verbose);
    if let Err(e) = fsx.run() {
        fsx.fail(&e);
    }
    let model = std::mem::take(&mut fsx.model);
    let counts = fsx.counts_line();
    drop(fsx);

    let log = m.log();
    assert!(
        !log.contains("panicked"),
        "the daemon panicked (seed {seed:#x}):\n{log}"
    );
    SIGBUS_UNMOUNT.lock().unwrap().take();
    let status = m.unmount();
    assert!(status.success(), "the daemon exited with {status}:\n{log}");
    let backing = m.committed(NAME);
    if let Err(e) = compare("backing file after unmount", 0, &backing, &model) {
        panic!("fsx (seed {seed:#x}, {ops} ops): {e}");
    }
    eprintln!(
        "fsx: seed {seed:#x}, {ops} ops, max size {max_len}, {:.1?}: {counts}",
        started.elapsed()
    );
}

/// Reads a number from the environment: decimal, or hex with `0x`.
fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim().replace('_', "");
    let n = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(n.unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

/// xorshift64*, seeded through splitmix64 (so small seeds give well-mixed states).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_f491_4f6c_dd1d } else { z })
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    /// An I/O length: mostly small, sometimes up to `max`.
    fn len(&mut self, max: u64) -> u64 {
        match self.below(4) {
            0 => self.range(1, max.min(64)),
            1 => self.range(1, max.min(4096)),
            _ => self.range(1, max),
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Compares what was read (`got`, from file offset `base`) with the model (`want`); the error
/// names the first and last differing offsets, how many bytes differ, and the bytes there.
fn compare(what: &str, base: u64, got: &[u8], want: &[u8]) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let common = got.len().min(want.len());
    let differ: Vec<usize> = (0..common).filter(|&i| got[i] != want[i]).collect();
    let first = differ.first().copied().unwrap_or(common);
    let show = |b: &[u8], at: usize| -> String {
        let end = (at + 16).min(b.len());
        if at >= b.len() {
            "(end of data)".to_string()
        } else {
            format!("{:02x?}", &b[at..end])
        }
    };
    let mut msg = format!(
        "{what}: read {} bytes at offset {base:#x}, expected {}; first difference at \
         offset {:#x}\n  got      {}\n  expected {}",
        got.len(),
        want.len(),
        base + first as u64,
        show(got, first),
        show(want, first),
    );
    if let Some(&last) = differ.last() {
        let zeros = differ.iter().filter(|&&i| got[i] == 0).count();
        msg += &format!(
            "\n  {} of the {common} common bytes differ, the last at offset {:#x}; {zeros} of \
             them read as zero",
            differ.len(),
            base + last as u64,
        );
    }
    Err(msg)
}

/// Reads up to `len` bytes at `off`, stopping early only at the end of the file.
fn read_full_at(f: &File, off: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// A shared mapping of `len` bytes of the file from `off` (any offset: the mapping starts at the
/// page below it). Unmapped on drop.
struct Mapping {
    addr: *mut libc::c_void,
    map_len: usize,
    skip: usize,
    len: usize,
}

impl Mapping {
    fn new(f: &File, off: u64, len: u64, writable: bool, page: u64) -> Result<Mapping, String> {
        let start = off / page * page;
        let skip = (off - start) as usize;
        let map_len = skip + len as usize;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping of an open descriptor; only this struct uses the address.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                prot,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                start as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(format!(
                "mmap({map_len:#x} bytes at {start:#x}): {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Mapping {
            addr,
            map_len,
            skip,
            len: len as usize,
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping covers `skip + len` bytes, all within the file's size.
        unsafe { std::slice::from_raw_parts((self.addr as *const u8).add(self.skip), self.len) }
    }

    fn write(&mut self, data: &[u8]) {
        assert_eq!(data.len(), self.len);
        // SAFETY: as in `bytes`, and the mapping is writable.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.addr as *mut u8).add(self.skip),
                self.len,
            )
        }
    }

    fn msync(&self) -> Result<(), String> {
        // SAFETY: the whole mapping, which is live.
        if unsafe { libc::msync(self.addr, self.map_len, libc::MS_SYNC) } != 0 {
            return Err(format!(
                "msync(MS_SYNC): {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.addr, self.map_len) };
    }
}

fn io<T>(what: impl FnOnce() -> String, r: std::io::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{}: {e}", what()))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Write,
    Read,
    Truncate,
    Fallocate,
    CopyIn,
    Fstat,
    MapRead,
    MapWrite,
    Fsync,
    Peek,
    CloseReopen,
    Second,
    TruncReopen,
    ExpireCache,
}

const OPS: [Op; 14] = [
    Op::Write,
    Op::Read,
    Op::Truncate,
    Op::Fallocate,
    Op::CopyIn,
    Op::Fstat,
    Op::MapRead,
    Op::MapWrite,
    Op::Fsync,
    Op::Peek,
    Op::CloseReopen,
    Op::Second,
    Op::TruncReopen,
    Op::ExpireCache,
];

struct Fsx<'a> {
    m: &'a Mounted,
    rng: Rng,
    seed: u64,
    ops: u64,
    max_len: u64,
    page: u64,
    verbose: bool,
    /// What the file holds for its writers.
    model: Vec<u8>,
    /// What a fresh reader may see: the last committed version, and after a write through a
    /// mapping (whose `msync` may commit) also the model at that point.
    committed: Vec<Vec<u8>>,
    /// The read-write descriptor.
    f: Option<File>,
    /// A second read-write descriptor sharing `f`'s working copy, and for how many more ops.
    second: Option<File>,
    /// The file `copy_file_range` copies from (open read-only), and its content.
    source: Option<(File, Vec<u8>)>,
    second_left: u64,
    /// A read-only descriptor opened while nothing else had the file open (a passthrough
    /// reader for files of 1 MiB or more), and the version it must keep reading.
    holder: Option<(File, Vec<u8>)>,
    /// The mount reads large files through passthrough.
    passthrough: bool,
    /// How many holders were opened.
    holders: u64,
    /// `f` was opened with `O_TRUNC`: a private writer, which no other open shares.
    truncating: bool,
    op: u64,
    log: Vec<String>,
    counts: [u64; OPS.len()],
}

impl<'a> Fsx<'a> {
    fn new(m: &'a Mounted, seed: u64, ops: u64, max_len: u64, verbose: bool) -> Fsx<'a> {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        Fsx {
            m,
            rng: Rng::new(seed),
            seed,
            ops,
            max_len,
            page,
            verbose,
            model: Vec::new(),
            committed: Vec::new(),
            f: None,
            second: None,
            source: None,
            second_left: 0,
            holder: None,
            holders: 0,
            passthrough: !m.log().contains("large files are read through the daemon"),
            truncating: false,
            op: 0,
            log: Vec::new(),
            counts: [0; OPS.len()],
        }
    }

    fn run(&mut self) -> Result<(), String> {
        // Start from a committed file of random size and content.
        let len = self.rng.below(self.max_len / 2 + 1) as usize;
        self.model = self.rng.bytes(len);
        io(
            || "write the initial file".into(),
            fs::write(self.m.p(NAME), &self.model),
        )?;
        self.note(format!("create size {len:#x}"));
        self.committed = vec![self.model.clone()];
        self.check_committed("the initial file")?;
        let source_len = MAX_IO + self.rng.below(self.max_len / 2);
        let source = self.rng.bytes(source_len as usize);
        io(
            || "write the source file".into(),
            fs::write(self.m.p(SOURCE), &source),
        )?;
        let file = io(
            || "open the source file".into(),
            File::open(self.m.p(SOURCE)),
        )?;
        self.source = Some((file, source));
        self.open(false)?;
        for op in 0..self.ops {
            self.op = op;
            self.step()?;
        }
        self.op = self.ops;
        self.close_all()?;
        self.release_holder()
    }

    /// Replaces the holder by a fresh read-only descriptor of the committed file: with
    /// nothing else open, the kernel reads it straight from the disk (passthrough), and the
    /// writer opened next gets the file under a new inode.
    fn hold(&mut self) -> Result<(), String> {
        self.release_holder()?;
        self.note(format!(
            "hold a read-only descriptor (size {:#x})",
            self.size()
        ));
        let file = io(|| "open the holder".into(), File::open(self.m.p(NAME)))?;
        if self
            .m
            .log()
            .contains("large files are read through the daemon")
        {
            // Passthrough turned out unavailable (it is tried at the first large open).
            self.passthrough = false;
            return Ok(());
        }
        self.holders += 1;
        self.holder = Some((file, self.model.clone()));
        Ok(())
    }

    /// Checks that the holder still reads the version it opened, whole, and closes it.
    fn release_holder(&mut self) -> Result<(), String> {
        let Some((file, version)) = self.holder.take() else {
            return Ok(());
        };
        let mut seen = vec![0u8; version.len() + 1];
        let mut done = 0;
        while done < seen.len() {
            let n = io(
                || "read the holder".into(),
                file.read_at(&mut seen[done..], done as u64),
            )?;
            if n == 0 {
                break;
            }
            done += n;
        }
        seen.truncate(done);
        self.note(format!("release the holder (size {:#x})", version.len()));
        compare("the holder's version", 0, &seen, &version)
    }

    fn step(&mut self) -> Result<(), String> {
        // Waiting out the cache takes a second: about 3 times in the default run.
        let op = if self.rng.below(1000) == 0 {
            Op::ExpireCache
        } else {
            match self.rng.below(100) {
                0..23 => Op::Write,
                23..25 => Op::CopyIn,
                25..45 => Op::Read,
                45..48 => Op::Fallocate,
                48..54 => Op::Truncate,
                54..58 => Op::Fstat,
                58..66 => Op::MapRead,
                66..74 => Op::MapWrite,
                74..79 => Op::Fsync,
                79..85 => Op::Peek,
                85..89 => Op::CloseReopen,
                89..98 => Op::Second,
                _ => Op::TruncReopen,
            }
        };
        self.counts[OPS.iter().position(|&o| o == op).unwrap()] += 1;
        match op {
            Op::Write => self.write()?,
            Op::Read => self.read()?,
            Op::Truncate => self.truncate()?,
            Op::Fallocate => self.fallocate()?,
            Op::CopyIn => self.copy_in()?,
            Op::Fstat => self.fstat()?,
            Op::MapRead => self.map_read()?,
            Op::MapWrite => self.map_write()?,
            Op::Fsync => self.fsync()?,
            Op::Peek => self.peek()?,
            Op::CloseReopen => {
                if self.second.is_some() && self.rng.percent(50) {
                    // The second descriptor stays open and carries on as the first.
                    self.close_first()?;
                    self.f = self.second.take();
                } else {
                    self.close_all()?;
                    // Only a passthrough reader: a reader through the page cache would make
                    // fstat show the committed size to the writer (see the README).
                    if self.passthrough && self.size() >= 1 << 20 && self.rng.percent(30) {
                        self.hold()?;
                    }
                    self.open(false)?;
                }
            }
            Op::Second => {
                if self.second.is_some() {
                    self.close_second()?;
                } else if !self.truncating {
                    self.open_second()?;
                } else {
                    self.read()?;
                }
            }
            Op::TruncReopen => {
                self.close_all()?;
                self.open(true)?;
            }
            Op::ExpireCache => self.expire_cache()?,
        }
        if self.second.is_some() {
            self.second_left = self.second_left.saturating_sub(1);
            if self.second_left == 0 {
                self.close_second()?;
            }
        }
        Ok(())
    }

    fn note(&mut self, what: String) {
        let line = format!("#{} {what}", self.op);
        if self.verbose {
            eprintln!("fsx {line}");
        }
        self.log.push(line);
    }

    fn counts_line(&self) -> String {
        let mut line = OPS
            .iter()
            .zip(self.counts)
            .map(|(op, n)| format!("{op:?} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        line.push_str(&format!(", passthrough holders {}", self.holders));
        line
    }

    fn fail(&self, msg: &str) -> ! {
        panic!("{}", self.report(msg));
    }

    fn report(&self, msg: &str) -> String {
        let tail = self.log.len().saturating_sub(30);
        let daemon = self.m.log();
        let daemon: Vec<&str> = daemon.lines().collect();
        let dtail = daemon.len().saturating_sub(30);
        format!(
            "fsx failed at op {} of {} (seed {:#x}, max size {:#x}): {msg}\n\
             reproduce: ROOMFS_FSX_SEED={:#x} ROOMFS_FSX_OPS={} ROOMFS_FSX_MAXLEN={} \
             cargo test --test fsx -- --nocapture\n\
             last operations:\n  {}\n\
             daemon log (last lines):\n  {}",
            self.op,
            self.ops,
            self.seed,
            self.max_len,
            self.seed,
            self.op + 1,
            self.max_len,
            self.log[tail..].join("\n  "),
            daemon[dtail..].join("\n  "),
        )
    }

    /// Which descriptor an operation uses: 0 is `f`, 1 the second one (when open).
    fn pick(&mut self) -> usize {
        usize::from(self.second.is_some() && self.rng.percent(50))
    }

    fn fd(&self, which: usize) -> &File {
        match which {
            0 => self.f.as_ref().expect("the file is open"),
            _ => self.second.as_ref().expect("the second descriptor is open"),
        }
    }

    fn size(&self) -> u64 {
        self.model.len() as u64
    }

    // ---- operations ---------------------------------------------------------------------

    fn write(&mut self) -> Result<(), String> {
        let which = self.pick();
        let len = self.rng.len(MAX_IO);
        let off = if self.rng.percent(20) {
            // At or just past the end, as appends and growing files do.
            (self.size() + self.rng.below(2 * self.page)).min(self.max_len - len)
        } else {
            self.rng.below(self.max_len - len + 1)
        };
        let data = self.rng.bytes(len as usize);
        let before = self.size();
        let end = (off + len) as usize;
        if end > self.model.len() {
            self.model.resize(end, 0);
        }
        self.model[off as usize..end].copy_from_slice(&data);
        self.note(format!(
            "pwrite fd{which} {off:#x}+{len:#x} (size {before:#x} -> {:#x})",
            self.size()
        ));
        io(
            || format!("pwrite {off:#x}+{len:#x}"),
            self.fd(which).write_all_at(&data, off),
        )?;
        self.other_sees(which, off, &data, "wrote")
    }

    /// The second descriptor, when open, shares the working copy: it sees at once what
    /// descriptor `which` just put at `off`.
    fn other_sees(&self, which: usize, off: u64, data: &[u8], did: &str) -> Result<(), String> {
        if self.second.is_none() || data.is_empty() {
            return Ok(());
        }
        let other = 1 - which;
        let got = io(
            || format!("pread fd{other} after fd{which} {did}"),
            read_full_at(self.fd(other), off, data.len() as u64),
        )?;
        compare(
            &format!("pread through fd{other} of what fd{which} just {did}"),
            off,
            &got,
            data,
        )
    }

    fn read(&mut self) -> Result<(), String> {
        let which = self.pick();
        let size = self.size();
        let off = if self.rng.percent(10) {
            size + self.rng.below(2 * self.page)
        } else {
            self.rng.below(size + 1)
        };
        let len = self.rng.len(MAX_IO);
        self.note(format!(
            "pread fd{which} {off:#x}+{len:#x} (size {size:#x})"
        ));
        let got = io(
            || format!("pread {off:#x}+{len:#x}"),
            read_full_at(self.fd(which), off, len),
        )?;
        let from = off.min(size) as usize;
        let to = (off + len).min(size) as usize;
        compare(
            &format!("pread fd{which}"),
            off,
            &got,
            &self.model[from..to],
        )
    }

    fn truncate(&mut self) -> Result<(), String> {
        let which = self.pick();
        let size = self.size();
        let to = match self.rng.below(4) {
            0 => size.saturating_sub(self.rng.below(self.page * 2)),
            1 => (size + self.rng.below(self.page * 2)).min(self.max_len),
            _ => self.rng.below(self.max_len + 1),
        };
        self.note(format!("ftruncate fd{which} {size:#x} -> {to:#x}"));
        self.model.resize(to as usize, 0);
        io(
            || format!("ftruncate to {to:#x}"),
            self.fd(which).set_len(to),
        )
    }

    fn fallocate(&mut self) -> Result<(), String> {
        let which = self.pick();
        let size = self.size();
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let (mode, name) = match self.rng.below(5) {
            0 => (0, "grow"),
            1 => (keep, "keep-size"),
            2 => (libc::FALLOC_FL_PUNCH_HOLE | keep, "punch-hole"),
            3 => (libc::FALLOC_FL_ZERO_RANGE, "zero-range"),
            _ => (libc::FALLOC_FL_ZERO_RANGE | keep, "zero-range keep-size"),
        };
        let len = self.rng.len(2 * MAX_IO);
        let off = if self.rng.percent(20) {
            (size + self.rng.below(2 * self.page)).min(self.max_len - len)
        } else {
            self.rng.below(self.max_len - len + 1)
        };
        let end = (off + len) as usize;
        if mode & keep == 0 && end > self.model.len() {
            self.model.resize(end, 0);
        }
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            let to = end.min(self.model.len());
            if (off as usize) < to {
                self.model[off as usize..to].fill(0);
            }
        }
        self.note(format!(
            "fallocate fd{which} {name} {off:#x}+{len:#x} (size {size:#x} -> {:#x})",
            self.size()
        ));
        let fd = self.fd(which).as_raw_fd();
        // SAFETY: a plain system call on an open descriptor.
        let r = unsafe { libc::fallocate(fd, mode, off as libc::off_t, len as libc::off_t) };
        io(
            || format!("fallocate {name} {off:#x}+{len:#x}"),
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            },
        )
    }

    fn copy_in(&mut self) -> Result<(), String> {
        let which = self.pick();
        let src_len = self.source.as_ref().expect("the source is open").1.len() as u64;
        let off_in = self.rng.below(src_len + 1);
        let len = self.rng.len(2 * MAX_IO).min(self.max_len);
        let off_out = if self.rng.percent(20) {
            (self.size() + self.rng.below(2 * self.page)).min(self.max_len - len)
        } else {
            self.rng.below(self.max_len - len + 1)
        };
        let n = len.min(src_len - off_in);
        let (source_file, source) = self.source.as_ref().expect("the source is open");
        let copied = source[off_in as usize..(off_in + n) as usize].to_vec();
        let (src_fd, dst_fd) = (source_file.as_raw_fd(), self.fd(which).as_raw_fd());
        let before = self.size();
        let end = (off_out + n) as usize;
        if end > self.model.len() {
            self.model.resize(end, 0);
        }
        self.model[off_out as usize..end].copy_from_slice(&copied);
        self.note(format!(
            "copy_file_range fd{which} {off_in:#x}+{len:#x} -> {off_out:#x} (size {before:#x} \
             -> {:#x})",
            self.size()
        ));
        // The kernel may copy less per call: call again for the rest, as `cp` does.
        let mut done = 0u64;
        while done < n {
            let (mut from, mut to) = ((off_in + done) as i64, (off_out + done) as i64);
            // SAFETY: plain system call on open descriptors and offsets on the stack.
            let r = unsafe {
                libc::copy_file_range(src_fd, &mut from, dst_fd, &mut to, (n - done) as usize, 0)
            };
            match r {
                r if r > 0 => done += r as u64,
                0 => return Err(format!("copy_file_range stopped after {done:#x} of {n:#x}")),
                _ => {
                    let e = std::io::Error::last_os_error();
                    return Err(format!("copy_file_range {off_in:#x}+{n:#x}: {e}"));
                }
            }
        }
        self.other_sees(which, off_out, &copied, "copied")
    }

    fn fstat(&mut self) -> Result<(), String> {
        let which = self.pick();
        self.note(format!("fstat fd{which} (size {:#x})", self.size()));
        let len = io(|| "fstat".into(), self.fd(which).metadata())?.len();
        if len != self.size() {
            return Err(format!(
                "fstat fd{which}: size {len:#x}, expected {:#x}",
                self.size()
            ));
        }
        Ok(())
    }

    fn map_read(&mut self) -> Result<(), String> {
        let size = self.size();
        if size == 0 {
            self.note("mapread skipped: empty file".into());
            return Ok(());
        }
        let which = self.pick();
        let off = self.rng.below(size);
        let len = self.rng.len(MAX_IO.min(size - off));
        self.note(format!(
            "mapread fd{which} {off:#x}+{len:#x} (size {size:#x})"
        ));
        self.before_mapping(which)?;
        let map = Mapping::new(self.fd(which), off, len, false, self.page)?;
        let got = map.bytes().to_vec();
        drop(map);
        self.after_mapping();
        let want = &self.model[off as usize..(off + len) as usize];
        compare(&format!("mapread fd{which}"), off, &got, want)
    }

    fn map_write(&mut self) -> Result<(), String> {
        let which = self.pick();
        let size = self.size();
        let len = self.rng.len(MAX_IO);
        // Mostly within the file; otherwise, as fsx does, grow it with ftruncate first.
        let off = if size >= len && self.rng.percent(75) {
            self.rng.below(size - len + 1)
        } else {
            self.rng.below(self.max_len - len + 1)
        };
        let end = off + len;
        if end > size {
            self.note(format!(
                "mapwrite fd{which}: ftruncate {size:#x} -> {end:#x} first"
            ));
            self.model.resize(end as usize, 0);
            io(
                || format!("ftruncate to {end:#x}"),
                self.fd(which).set_len(end),
            )?;
        }
        let data = self.rng.bytes(len as usize);
        self.model[off as usize..end as usize].copy_from_slice(&data);
        self.note(format!(
            "mapwrite fd{which} {off:#x}+{len:#x} (size {:#x}), msync, munmap",
            self.size()
        ));
        self.before_mapping(which)?;
        let mut map = Mapping::new(self.fd(which), off, len, true, self.page)?;
        map.write(&data);
        map.msync()?;
        let got = map.bytes().to_vec();
        drop(map);
        self.after_mapping();
        compare(&format!("mapping fd{which} after msync"), off, &got, &data)?;
        // msync(MS_SYNC) reaches the daemon as an fsync, which may commit: fresh readers see
        // either version (`peek` settles which).
        if !self.committed.contains(&self.model) {
            self.committed.push(self.model.clone());
        }
        // The written bytes read back through a descriptor.
        let other = self.pick();
        let got = io(
            || format!("pread fd{other} after mapwrite"),
            read_full_at(self.fd(other), off, len),
        )?;
        compare(
            &format!("pread fd{other} of what the mapping of fd{which} wrote"),
            off,
            &got,
            &data,
        )
    }

    fn fsync(&mut self) -> Result<(), String> {
        let which = self.pick();
        let data_only = self.rng.percent(30);
        let call = if data_only { "fdatasync" } else { "fsync" };
        self.note(format!("{call} fd{which} (size {:#x})", self.size()));
        let f = self.fd(which);
        io(
            || call.into(),
            if data_only {
                f.sync_data()
            } else {
                f.sync_all()
            },
        )?;
        self.committed = vec![self.model.clone()];
        self.check_committed(&format!("after {call} fd{which}"))
    }

    /// A fresh reader sees a committed version (the last one), never uncommitted writes.
    fn peek(&mut self) -> Result<(), String> {
        self.note(format!(
            "peek: fresh read of the mount and the backing file ({} candidate versions)",
            self.committed.len()
        ));
        let mount = io(|| "read the mount path".into(), fs::read(self.m.p(NAME)))?;
        // The committed file in the data dir, or the object in the bucket.
        let backing = self.m.committed(NAME);
        for (what, got) in [("mount path", &mount), ("backing file", &backing)] {
            if !self.committed.contains(got) {
                let last = self.committed.last().expect("a committed version");
                let e = compare(&format!("fresh read of the {what}"), 0, got, last).unwrap_err();
                return Err(format!(
                    "{e}\n  (the file is open with uncommitted changes; expected the last \
                     committed version; the model has {:#x} bytes)",
                    self.size()
                ));
            }
        }
        if mount != backing {
            return Err("the mount and the backing file show different versions".into());
        }
        self.committed = vec![mount];
        Ok(())
    }

    /// Before touching a mapping of `which`: its size must be the model's (the kernel raises
    /// SIGBUS for pages past what it thinks is the end), and a SIGBUS all the same is reported.
    fn before_mapping(&mut self, which: usize) -> Result<(), String> {
        let len = io(|| "fstat before mmap".into(), self.fd(which).metadata())?.len();
        if len != self.size() {
            return Err(format!(
                "fstat fd{which} before mmap: size {len:#x}, expected {:#x}",
                self.size()
            ));
        }
        let note = self.report("SIGBUS while touching the mapping of the last operation");
        *SIGBUS_NOTE.lock().unwrap() = format!("\n{note}\n").into_bytes();
        Ok(())
    }

    fn after_mapping(&self) {
        SIGBUS_NOTE.lock().unwrap().clear();
    }

    /// Waits until the kernel's cached attributes and entry of the file have expired, then
    /// looks the path up again (as any `stat` or `open` by anybody does): what the writer reads
    /// and its `fstat` must still be its working copy, not the committed file.
    fn expire_cache(&mut self) -> Result<(), String> {
        std::thread::sleep(CACHE_EXPIRY);
        let len = io(
            || "stat the mount path".into(),
            fs::metadata(self.m.p(NAME)),
        )?
        .len();
        let committed = self.committed.last().map_or(0, |c| c.len());
        self.note(format!(
            "wait {CACHE_EXPIRY:?} for the kernel's cache to expire, stat the path: size \
             {len:#x} (model {:#x}, committed {committed:#x})",
            self.size()
        ));
        let which = self.pick();
        let got = io(|| format!("fstat fd{which}"), self.fd(which).metadata())?.len();
        let size = self.size();
        let data = io(
            || format!("pread fd{which}"),
            read_full_at(self.fd(which), 0, size + self.page),
        )?;
        compare(
            &format!("pread fd{which} of the whole file after a lookup (fstat then said {got:#x})"),
            0,
            &data,
            &self.model,
        )?;
        if got != size {
            return Err(format!(
                "fstat fd{which} after a lookup: size {got:#x}, expected {size:#x}"
            ));
        }
        Ok(())
    }

    // ---- opening and closing ------------------------------------------------------------

    fn open(&mut self, truncate: bool) -> Result<(), String> {
        let what = if truncate { "O_RDWR|O_TRUNC" } else { "O_RDWR" };
        self.note(format!("open {what}"));
        let f = io(
            || format!("open {what}"),
            OpenOptions::new()
                .read(true)
                .write(true)
                .truncate(truncate)
                .open(self.m.p(NAME)),
        )?;
        self.f = Some(f);
        self.truncating = truncate;
        if truncate {
            self.model.clear();
        }
        Ok(())
    }

    fn open_second(&mut self) -> Result<(), String> {
        self.second_left = self.rng.range(3, 40);
        self.note(format!(
            "open a second O_RDWR descriptor for {} ops",
            self.second_left
        ));
        let f = io(
            || "open the second descriptor".into(),
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.m.p(NAME)),
        )?;
        self.second = Some(f);
        // It joins the working copy: it sees what the first wrote and has not committed.
        let size = self.size();
        let off = self.rng.below(size + 1);
        let len = self.rng.len(MAX_IO);
        let got = io(
            || "pread the second descriptor".into(),
            read_full_at(self.fd(1), off, len),
        )?;
        let want = &self.model[off as usize..(off + len).min(size) as usize];
        compare("pread fd1 right after its open", off, &got, want)
    }

    fn close_second(&mut self) -> Result<(), String> {
        self.note(format!(
            "close the second descriptor (size {:#x})",
            self.size()
        ));
        drop(self.second.take());
        // Its close commits what both descriptors wrote.
        self.committed = vec![self.model.clone()];
        self.check_committed("after closing the second descriptor")
    }

    /// Closes both descriptors (in random order), checking the commit after each close.
    fn close_all(&mut self) -> Result<(), String> {
        if self.second.is_some() && self.rng.percent(50) {
            self.close_second()?;
        }
        self.close_first()?;
        if self.second.is_some() {
            self.close_second()?;
        }
        Ok(())
    }

    fn close_first(&mut self) -> Result<(), String> {
        self.note(format!("close fd0 (size {:#x})", self.size()));
        drop(self.f.take());
        self.committed = vec![self.model.clone()];
        self.check_committed("after closing fd0")
    }

    /// A fresh read through the mount and of the backing file equals the model.
    fn check_committed(&self, when: &str) -> Result<(), String> {
        let mount = io(|| "read the mount path".into(), fs::read(self.m.p(NAME)))?;
        compare(
            &format!("fresh read of the mount path {when}"),
            0,
            &mount,
            &self.model,
        )?;
        // The committed file in the data dir, or the object in the bucket.
        let backing = self.m.committed(NAME);
        compare(
            &format!("read of the backing file {when}"),
            0,
            &backing,
            &self.model,
        )
    }
}
