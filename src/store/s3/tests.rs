//! Tests of the S3 store over the in-memory bucket (`mock`): what it asks of the bucket, what
//! two hosts sharing it see, and what failures and crashes leave. The core's own tests and
//! its model test run on this store too (`fs::tests`, `fs::tests_model`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::attrs::to_second;
use super::client::{Body, Condition, Failure, Metadata, ObjectClient};
use super::mock::{MemClient, Op};
use super::{S3Config, Shared, open_with};
use crate::space::{SpaceId, SpaceKind, Spaces};
use crate::store::{
    Change, CommitRequest, Content, Kind, RenameMode, SetAttr, Store, StoreResult, TimeSpec,
    WorkingCopy,
};

const MIB: u64 = 1 << 20;
/// The part size of these tests (S3's smallest).
const PART: u64 = 5 * MIB;

/// One host: its own local state, on a shared bucket.
struct Host {
    _dir: tempfile::TempDir,
    spaces: super::S3Spaces,
    store: Arc<dyn Store>,
}

/// How many records `host`'s journal holds (renames and uploads a restart would finish).
fn journaled(host: &Host) -> usize {
    let journal = host
        .spaces
        .shared()
        .state
        .spool_dir()
        .with_file_name("journal");
    std::fs::read_dir(journal).unwrap().count()
}

fn config() -> S3Config {
    let mut config = S3Config::new("test-bucket", "team");
    config.part_size = PART;
    config.cache_bytes = 256 * MIB;
    config.spool_bytes = 64 * MIB;
    config.metadata_ttl_secs = 60.0;
    config
}

fn host_with(client: &Arc<MemClient>, config: &S3Config) -> Host {
    let dir = tempfile::tempdir().unwrap();
    let spaces = open_with(client.clone(), config, dir.path(), "memory".into()).unwrap();
    let id = SpaceId::new(SpaceKind::Room, "r1").unwrap();
    let store = spaces.open_space(&id, Some(Some((1000, 1000)))).unwrap();
    Host {
        _dir: dir,
        spaces,
        store,
    }
}

fn host(client: &Arc<MemClient>) -> Host {
    host_with(client, &config())
}

/// Two hosts whose every stat and listing asks the store (no metadata TTL).
fn uncached_hosts(client: &Arc<MemClient>) -> (Host, Host) {
    let mut config = config();
    config.metadata_ttl_secs = 0.0;
    (host_with(client, &config), host_with(client, &config))
}

fn key(path: &str) -> String {
    format!("team/rooms/r1/{path}")
}

fn p(path: &str) -> &Path {
    Path::new(path)
}

/// Writes `bytes` at `path` through a working copy, as a close does.
fn write(store: &dyn Store, path: &str, bytes: &[u8]) -> StoreResult<Arc<dyn Content>> {
    if store.stat(p(path)).is_err() {
        store.create(p(path), 0o644, None, false)?;
    }
    let base = store.open(p(path))?;
    let copy = store.working_copy(p(path))?;
    copy.write_at(bytes, 0)?;
    commit_whole(store, path, &base, &copy)
}

fn commit_whole(
    store: &dyn Store,
    path: &str,
    base: &Arc<dyn Content>,
    copy: &Arc<dyn WorkingCopy>,
) -> StoreResult<Arc<dyn Content>> {
    Ok(store
        .commit(CommitRequest {
            path: p(path),
            base,
            change: Change::Whole(copy),
            durable: false,
            attrs: None,
        })?
        .content)
}

fn read(content: &dyn Content) -> Vec<u8> {
    let mut out = vec![0u8; content.meta().size as usize];
    let mut done = 0;
    while done < out.len() {
        let n = content.read_at(&mut out[done..], done as u64).unwrap();
        assert!(n > 0);
        done += n;
    }
    out
}

/// `len` bytes that differ with `seed` and do not repeat (a byte read from the wrong offset,
/// however far, shows).
fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i ^ u64::from(seed) << 48).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect()
}

#[test]
fn a_store_remembers_a_bounded_number_of_directories() {
    use super::store::{REMEMBERED_DIRS, S3Store};
    let client = Arc::new(MemClient::new());
    let n = REMEMBERED_DIRS + 1_000;
    for i in 0..n {
        client.insert(&key(&format!("d{i:05}/f")), b"x", Metadata::new());
    }
    // Every listing is past the TTL at once (a TTL of zero): none is worth keeping.
    let mut config = config();
    config.metadata_ttl_secs = 0.0;
    let dir = tempfile::tempdir().unwrap();
    let spaces = open_with(client.clone(), &config, dir.path(), "memory".into()).unwrap();
    let keys = super::keys::SpaceKeys::new("team", "rooms", "r1");
    let defaults = super::attrs::Defaults {
        uid: 1000,
        gid: 1000,
        dir_mtime: SystemTime::UNIX_EPOCH,
    };
    let store = S3Store::new(spaces.shared().clone(), keys, defaults);
    for i in 0..n {
        let listed = store.list(Path::new(&format!("d{i:05}"))).unwrap();
        assert_eq!(listed.len(), 1);
    }
    let (listings, indexes) = store.remembered_dirs();
    assert!(listings <= REMEMBERED_DIRS, "{listings} listings kept");
    assert!(indexes <= REMEMBERED_DIRS, "{indexes} indexes kept");
}

/// `rm -rf`, `git status` or a loop over sorted names in a directory of more than a page:
/// the names asked about in order are answered a page of the listing at a time, from the
/// name asked; names asked about in another order are asked about alone.
#[test]
fn names_looked_up_in_order_in_a_large_directory_are_answered_a_page_at_a_time() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    a.store.mkdir(p("big"), 0o755, None).unwrap();
    for i in (0..2500).filter(|i| ![1234, 2000].contains(i)) {
        let body = Body::Bytes(Arc::new(vec![b'x'; i % 7]));
        let k = key(&format!("big/f{i:05}"));
        client
            .put(&k, body, &Metadata::new(), &Condition::None)
            .unwrap();
    }
    a.store
        .create(p("big/f01234"), 0o600, Some((7, 8)), true)
        .unwrap();
    a.store.mkdir(p("big/f02000"), 0o700, None).unwrap();
    let b = host(&client);
    client.reset_counts();
    let mut seen = Vec::new();
    for i in 0..2500 {
        match b.store.stat(&Path::new("big").join(format!("f{i:05}"))) {
            Ok(m) => seen.push(m),
            Err(e) => panic!("f{i:05}: {e}"),
        }
    }
    let (heads, lists) = (client.count(Op::Head), client.count(Op::List));
    // Per page: the names asked about before the walk is seen, then a LIST (and the first
    // LIST tried a page of the whole directory). Without: a HEAD a name.
    assert!(heads <= 15, "{heads} HEADs for 2,500 names");
    assert!(lists <= 6, "{lists} LISTs");
    for (i, m) in seen.iter().enumerate() {
        let want = match i {
            1234 => (Kind::File, 0o600, 7, 8, 0),
            2000 => (Kind::Dir, 0o700, m.uid, m.gid, 0),
            _ => (Kind::File, 0o644, m.uid, m.gid, (i % 7) as u64),
        };
        assert_eq!((m.kind, m.perm, m.uid, m.gid, m.size), want, "f{i:05}");
    }
    // A name not there, inside what a page covered, is not there.
    let e = b.store.stat(p("big/f00500x")).unwrap_err();
    assert_eq!(e.raw_os_error(), libc::ENOENT);
    // In another order, once the TTL has passed: HEADs, and a LIST only where four names in
    // a row happen to come in order.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    client.reset_counts();
    let mut order: Vec<usize> = (0..300).map(|i| (i * 7919) % 2500).collect();
    order.dedup();
    for i in &order {
        b.store
            .stat(&Path::new("big").join(format!("f{i:05}")))
            .unwrap();
    }
    assert!(
        client.count(Op::List) <= 3,
        "{} LISTs",
        client.count(Op::List)
    );
}

#[test]
fn names_looked_up_one_by_one_in_a_directory_are_answered_by_one_listing() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    a.store.mkdir(p("d"), 0o755, None).unwrap();
    for i in 0..50 {
        write(a.store.as_ref(), &format!("d/f{i}"), b"x").unwrap();
    }
    a.store
        .create(p("d/secret"), 0o600, Some((7, 8)), true)
        .unwrap();
    a.store.mkdir(p("d/sub"), 0o700, None).unwrap();
    let names: Vec<String> = (0..50)
        .map(|i| format!("d/f{i}"))
        .chain(["d/secret".into(), "d/sub".into()])
        .collect();
    // Another host stats them one by one, as `git status` or `make` do: the first few are
    // asked about alone, then one LIST answers for the rest (within the TTL).
    let b = host(&client);
    client.reset_counts();
    let seen: Vec<_> = names.iter().map(|n| b.store.stat(p(n)).unwrap()).collect();
    assert_eq!(
        client.count(Op::Head),
        u64::from(super::store::LIST_AFTER - 1)
    );
    assert_eq!(client.count(Op::List), 1);
    // What the listing said is what a HEAD says (a host that remembers nothing).
    let (c, _) = uncached_hosts(&client);
    for (n, l) in names.iter().zip(&seen) {
        let m = c.store.stat(p(n)).unwrap();
        assert_eq!(
            (m.kind, m.perm, m.uid, m.gid, m.mtime, m.size),
            (l.kind, l.perm, l.uid, l.gid, l.mtime, l.size),
            "{n}"
        );
    }
    assert_eq!((seen[50].perm, seen[50].uid, seen[50].gid), (0o600, 7, 8));
    assert_eq!((seen[51].kind, seen[51].perm), (Kind::Dir, 0o700));
    // A name not there, among them, is not there.
    let e = b.store.stat(p("d/absent")).unwrap_err();
    assert_eq!(e.raw_os_error(), libc::ENOENT);
    // With nothing remembered (a TTL of zero), a listing would answer nothing later: HEADs.
    client.reset_counts();
    for n in &names[..10] {
        c.store.stat(p(n)).unwrap();
    }
    assert_eq!((client.count(Op::Head), client.count(Op::List)), (10, 0));
}

#[test]
fn names_looked_up_in_vain_in_a_large_directory_are_asked_about_alone() {
    let client = Arc::new(MemClient::new());
    // More than a page of a listing (1,000 keys).
    for i in 0..1_500 {
        client.insert(&key(&format!("big/f{i:05}")), b"x", Metadata::new());
    }
    for i in 0..10 {
        client.insert(&key(&format!("small/f{i}")), b"x", Metadata::new());
    }
    // Every lookup asks the store (no metadata TTL), as one does once the TTL has passed.
    let (a, _) = uncached_hosts(&client);
    let absent = |dir: &str, i: usize| {
        let e = a
            .store
            .stat(&Path::new(dir).join(format!("new{i}")))
            .unwrap_err();
        assert_eq!(e.raw_os_error(), libc::ENOENT);
    };
    client.reset_counts();
    for i in 0..10 {
        absent("big", i);
    }
    // The first lookup lists a page of the directory and sees more follow; from then on
    // each name is asked about alone: a HEAD, and a LIST of its own prefix (a directory?).
    assert_eq!(client.count(Op::Head), 10);
    assert_eq!(
        client.count(Op::List),
        11,
        "not a page of the directory per name"
    );
    // A whole listing that fits in a page again lists it again at the next lookup.
    let extra: Vec<String> = (0..600).map(|i| key(&format!("big/f{i:05}"))).collect();
    client.delete_many(&extra).unwrap();
    assert_eq!(a.store.list(p("big")).unwrap().len(), 900);
    client.reset_counts();
    absent("big", 0);
    assert_eq!((client.count(Op::Head), client.count(Op::List)), (1, 1));
    // A small directory's one LIST answers for the name (and, within the TTL, for others).
    client.reset_counts();
    absent("small", 0);
    assert_eq!((client.count(Op::Head), client.count(Op::List)), (1, 1));
}

#[test]
fn a_listing_is_one_list_and_shows_modes_owners_and_kinds() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    for i in 0..50 {
        write(a.store.as_ref(), &format!("f{i}"), b"x").unwrap();
    }
    a.store
        .create(p("secret"), 0o600, Some((7, 8)), true)
        .unwrap();
    a.store.symlink(p("f1"), p("link"), None).unwrap();
    a.store.mknod(p("pipe"), Kind::Fifo, 0o640, None).unwrap();
    a.store.mkdir(p("private"), 0o700, None).unwrap();
    a.store.mkdir(p("plain"), 0o755, None).unwrap();
    // Another host, with nothing remembered: one LIST and one GET of the index.
    let b = host(&client);
    client.reset_counts();
    let listed = b.store.list(p("")).unwrap();
    assert_eq!(client.count(Op::List), 1);
    assert_eq!(client.count(Op::Get), 1, "the directory's index");
    assert_eq!(client.count(Op::Head), 0);
    let by = |n: &str| {
        listed
            .iter()
            .find(|e| e.name == n)
            .and_then(|e| e.meta.clone())
            .unwrap_or_else(|| panic!("{n} listed"))
    };
    assert_eq!(listed.len(), 55);
    let secret = by("secret");
    assert_eq!((secret.perm, secret.uid, secret.gid), (0o600, 7, 8));
    assert_eq!(by("link").kind, Kind::Symlink);
    assert_eq!(by("pipe").kind, Kind::Fifo);
    assert_eq!((by("private").kind, by("private").perm), (Kind::Dir, 0o700));
    let plain = by("f3");
    assert_eq!((plain.perm, plain.uid, plain.gid), (0o644, 1000, 1000));
    // What the listing showed is what a stat shows, without asking again...
    for e in &listed {
        let m = b.store.stat(&Path::new("").join(&e.name)).unwrap();
        assert_eq!(m.perm, e.meta.as_ref().unwrap().perm);
    }
    assert_eq!(client.count(Op::Head), 0);
    // ...and what a HEAD says (a third host, nothing remembered).
    let c = host(&client);
    for n in ["secret", "link", "pipe", "f3"] {
        let m = c.store.stat(p(n)).unwrap();
        let l = by(n);
        assert_eq!(
            (m.kind, m.perm, m.uid, m.gid, m.mtime, m.size),
            (l.kind, l.perm, l.uid, l.gid, l.mtime, l.size),
            "{n}"
        );
    }
    // A listing of a directory whose index did not change does not read it again.
    client.reset_counts();
    b.store.list(p("")).unwrap();
    assert_eq!((client.count(Op::List), client.count(Op::Get)), (1, 0));
    // Ordinary files need no index entry: the index holds only the unusual ones.
    let index: super::attrs::Index =
        serde_json::from_slice(&client.object(&key(".roomfs-attrs")).unwrap()).unwrap();
    let mut names: Vec<&str> = index.entries.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, [".", "link", "pipe", "private", "secret"]);
}

#[test]
fn of_two_hosts_racing_for_a_name_exactly_one_wins() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    a.store.create(p("lock"), 0o644, None, true).unwrap();
    let e = b.store.create(p("lock"), 0o644, None, true).unwrap_err();
    assert_eq!(e.raw_os_error(), libc::EEXIST);
    a.store.mkdir(p("d"), 0o755, None).unwrap();
    assert_eq!(
        b.store
            .mkdir(p("d"), 0o755, None)
            .unwrap_err()
            .raw_os_error(),
        libc::EEXIST
    );
    a.store.symlink(p("x"), p("s"), None).unwrap();
    assert_eq!(
        b.store
            .symlink(p("y"), p("s"), None)
            .unwrap_err()
            .raw_os_error(),
        libc::EEXIST
    );
    write(a.store.as_ref(), "src-a", b"a").unwrap();
    write(b.store.as_ref(), "src-b", b"b").unwrap();
    a.store
        .rename(p("src-a"), p("dst"), RenameMode::NoReplace)
        .unwrap();
    // B has not seen dst: the copy's own condition refuses it.
    let e = b
        .store
        .rename(p("src-b"), p("dst"), RenameMode::NoReplace)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), libc::EEXIST);
    assert_eq!(client.object(&key("dst")).unwrap(), b"a");
    assert_eq!(
        client.object(&key("src-b")).unwrap(),
        b"b",
        "the loser keeps its name"
    );
    // Exchange cannot be done atomically on S3, hard links not at all.
    assert_eq!(
        a.store
            .rename(p("dst"), p("src-b"), RenameMode::Exchange)
            .unwrap_err()
            .raw_os_error(),
        libc::EINVAL
    );
    assert_eq!(
        a.store.link(p("dst"), p("l")).unwrap_err().raw_os_error(),
        libc::EPERM
    );
    assert!(!a.store.capabilities().hard_links);
}

/// A host that looked a name up in vain, then loses the race to make it (`mkdir -p` on two
/// hosts), finds what the other host made at its next lookup: not `EEXIST`, then `ENOENT`.
#[test]
fn a_name_another_host_made_since_it_was_looked_up_is_found_after_eexist() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    assert_eq!(
        b.store.stat(p("nd")).unwrap_err().raw_os_error(),
        libc::ENOENT
    );
    a.store.mkdir(p("nd"), 0o755, None).unwrap();
    assert_eq!(
        b.store
            .mkdir(p("nd"), 0o755, None)
            .unwrap_err()
            .raw_os_error(),
        libc::EEXIST
    );
    assert_eq!(b.store.stat(p("nd")).unwrap().kind, Kind::Dir);
    // The same for a file made with O_EXCL.
    assert_eq!(
        b.store.stat(p("f")).unwrap_err().raw_os_error(),
        libc::ENOENT
    );
    a.store.create(p("f"), 0o644, None, true).unwrap();
    assert_eq!(
        b.store
            .create(p("f"), 0o644, None, true)
            .unwrap_err()
            .raw_os_error(),
        libc::EEXIST
    );
    assert_eq!(b.store.stat(p("f")).unwrap().kind, Kind::File);
}

/// A HEAD on its way while this host commits a new version of the file answers the old one:
/// that answer is not remembered over the commit (the kernel would be told the old size for
/// the new bytes until the TTL passes, and cut its reads there).
#[test]
fn an_answer_older_than_this_hosts_change_is_not_remembered_over_it() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    write(b.store.as_ref(), "f", b"old").unwrap();
    // A does not know the file yet: its stat asks, and the answer comes late.
    let base = a.store.open(p("f")).unwrap();
    a.store.forget(p("f"), false);
    client.slow_head_replies(Duration::from_millis(400), 1);
    std::thread::scope(|scope| {
        let asking = scope.spawn(|| a.store.stat(p("f")).unwrap().size);
        std::thread::sleep(Duration::from_millis(100));
        let copy = a.store.working_copy(p("f")).unwrap();
        copy.write_at(b"newer", 0).unwrap();
        commit_whole(a.store.as_ref(), "f", &base, &copy).unwrap();
        asking.join().unwrap();
    });
    assert_eq!(
        a.store.stat(p("f")).unwrap().size,
        5,
        "the commit's, not the late answer's"
    );
}

#[test]
fn appends_from_two_hosts_keep_both_hosts_bytes() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    write(a.store.as_ref(), "log", b"start\n").unwrap();
    let base_a = a.store.open(p("log")).unwrap();
    let base_b = b.store.open(p("log")).unwrap();
    let append = |s: &dyn Store, base: &Arc<dyn Content>, tail: &[u8]| {
        s.commit(CommitRequest {
            path: p("log"),
            base,
            change: Change::Append { tail, follow: true },
            durable: false,
            attrs: None,
        })
        .unwrap()
    };
    let first = append(b.store.as_ref(), &base_b, b"from b\n");
    assert!(!first.followed);
    // A appends from the version before B's: its bytes go after B's.
    let second = append(a.store.as_ref(), &base_a, b"from a\n");
    assert!(second.followed, "it followed B's append");
    assert_eq!(read(second.content.as_ref()), b"start\nfrom b\nfrom a\n");
    assert_eq!(
        client.object(&key("log")).unwrap(),
        b"start\nfrom b\nfrom a\n"
    );
    // A plain writer's bytes at the end (not O_APPEND) replace whole: the last close wins.
    let stale = a.store.open(p("log")).unwrap();
    append(
        b.store.as_ref(),
        &b.store.open(p("log")).unwrap(),
        b"b again\n",
    );
    a.store
        .commit(CommitRequest {
            path: p("log"),
            base: &stale,
            change: Change::Append {
                tail: b"a's end\n",
                follow: false,
            },
            durable: false,
            attrs: None,
        })
        .unwrap();
    assert_eq!(
        client.object(&key("log")).unwrap(),
        b"start\nfrom b\nfrom a\na's end\n"
    );
}

/// A reader here of a version this host wrote (the kernel may read its cached file itself,
/// passthrough) reads on into this host's append that went after another host's append, not
/// heard of yet: the cached file grows to the new version, the other host's bytes fetched.
/// A small log's base is read to write the append (the fetch grows the file); a large one's
/// is copied by the store (the file grows after the commit).
#[test]
fn an_append_after_another_hosts_grows_the_cached_file_a_reader_holds() {
    use std::os::unix::fs::FileExt;
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    for (name, head) in [
        ("log", b"start\n".to_vec()),
        ("big.log", pattern(PART + 7, 3)),
    ] {
        write(a.store.as_ref(), name, &head).unwrap();
        let reader = a.store.open_to_read(p(name)).unwrap();
        let file = reader.local().expect("written here, cached whole").file;
        let append = |s: &dyn Store, tail: &[u8]| {
            let base = s.open(p(name)).unwrap();
            s.commit(CommitRequest {
                path: p(name),
                base: &base,
                change: Change::Append { tail, follow: true },
                durable: false,
                attrs: None,
            })
            .unwrap()
        };
        append(b.store.as_ref(), b"from b\n");
        assert!(append(a.store.as_ref(), b"from a\n").followed);
        let want = [head.as_slice(), b"from b\nfrom a\n"].concat();
        let start = std::time::Instant::now();
        let mut got = vec![0u8; want.len() + 1];
        loop {
            let n = file.read_at(&mut got, 0).unwrap();
            if got[..n] == want[..] {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{name}: the reader's file holds {n} bytes, ending {:?}",
                String::from_utf8_lossy(&got[n.saturating_sub(20)..n])
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn appends_to_a_large_object_copy_it_server_side() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    let big = pattern(2 * PART + 123, 1);
    write(a.store.as_ref(), "big.log", &big).unwrap();
    let base_a = a.store.open(p("big.log")).unwrap();
    let base_b = b.store.open(p("big.log")).unwrap();
    client.reset_counts();
    for (s, base, tail) in [
        (&b.store, &base_b, b"tail from b".as_slice()),
        (&a.store, &base_a, b"tail from a".as_slice()),
    ] {
        s.commit(CommitRequest {
            path: p("big.log"),
            base,
            change: Change::Append { tail, follow: true },
            durable: false,
            attrs: None,
        })
        .unwrap();
    }
    // (A's cached file, of the version A wrote, grows to the new version: B's bytes and A's
    // own after them are fetched, 22 bytes, nothing before.)
    assert!(
        client.bytes_got() <= 22,
        "nothing of the large base was downloaded: {} bytes",
        client.bytes_got()
    );
    assert!(client.count(Op::UploadPartCopy) >= 4);
    let mut want = big.clone();
    want.extend_from_slice(b"tail from btail from a");
    assert_eq!(client.object(&key("big.log")).unwrap(), want);
    assert_eq!(client.upload_count(), 0);
}

#[test]
fn a_sequential_writer_uploads_its_parts_before_the_close() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    a.store.create(p("big"), 0o640, None, false).unwrap();
    let base = a.store.open(p("big")).unwrap();
    let copy = a.store.working_copy(p("big")).unwrap();
    let data = pattern(4 * PART + 1000, 2);
    for chunk in data.chunks(MIB as usize).enumerate() {
        copy.write_at(chunk.1, chunk.0 as u64 * MIB).unwrap();
    }
    // The three parts written in full (with more after them) go up while the writer writes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while client.count(Op::UploadPart) < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(client.count(Op::UploadPart) >= 3);
    assert_eq!(client.upload_count(), 1);
    assert_eq!(
        client.count(Op::Complete),
        0,
        "nothing visible before the close"
    );
    assert!(client.object(&key("big")).unwrap().is_empty());
    // A write into an uploaded part: that part goes up again at the commit.
    copy.write_at(b"CHANGED", PART + 10).unwrap();
    let done = commit_whole(a.store.as_ref(), "big", &base, &copy).unwrap();
    let mut want = data.clone();
    want[PART as usize + 10..PART as usize + 17].copy_from_slice(b"CHANGED");
    assert_eq!(client.object(&key("big")).unwrap(), want);
    assert_eq!(client.count(Op::Complete), 1);
    assert_eq!(
        client.count(Op::UploadPart),
        6,
        "3 early, part 2 again, parts 4 and 5"
    );
    assert_eq!(client.upload_count(), 0);
    let meta = client.metadata(&key("big")).unwrap();
    assert_eq!(meta["mode"], (libc::S_IFREG | 0o640).to_string());
    // What this host just wrote is read from its cache: no GET, and a local file.
    client.reset_counts();
    assert_eq!(read(done.as_ref()), want);
    assert!(done.local().is_some());
    assert_eq!(client.count(Op::Get), 0);
    // A small file is one PUT.
    client.reset_counts();
    write(a.store.as_ref(), "small", b"tiny").unwrap();
    assert_eq!(client.count(Op::Put), 2, "the create and the commit");
    assert_eq!(client.count(Op::CreateUpload), 0);
}

#[test]
fn a_failed_commit_leaves_the_previous_object_and_no_upload_behind() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    let old = pattern(3 * PART, 3);
    write(a.store.as_ref(), "f", &old).unwrap();
    for (op, failure) in [
        (Op::Complete, Failure::Unavailable),
        (Op::UploadPart, Failure::Unavailable),
        (Op::CreateUpload, Failure::Denied),
    ] {
        let base = a.store.open(p("f")).unwrap();
        let copy = a.store.working_copy(p("f")).unwrap();
        client.fail(op, None, failure, 100);
        copy.write_at(&pattern(3 * PART, 4), 0).unwrap();
        let e = commit_whole(a.store.as_ref(), "f", &base, &copy)
            .err()
            .unwrap();
        assert_eq!(e.raw_os_error(), libc::EIO, "{op:?}: {e}");
        client.heal();
        // Early uploads run on their threads: wait for them to be aborted.
        drop(copy);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while client.upload_count() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(client.object(&key("f")).unwrap(), old, "{op:?}");
        assert_eq!(client.upload_count(), 0, "{op:?}: no parts left behind");
    }
    // A small file's failed PUT.
    let base = a.store.open(p("f")).unwrap();
    let copy = a.store.working_copy(p("f")).unwrap();
    copy.write_at(b"new", 0).unwrap();
    client.fail(Op::Put, None, Failure::Unavailable, 1);
    let e = commit_whole(a.store.as_ref(), "f", &base, &copy)
        .err()
        .unwrap();
    assert!(e.is_transient(), "{e}");
    assert_eq!(client.object(&key("f")).unwrap(), old);
    // The copy stays the writer's: the next close commits it.
    commit_whole(a.store.as_ref(), "f", &base, &copy).unwrap();
    assert_eq!(client.object(&key("f")).unwrap(), b"new");
}

/// An early upload the store leaves unanswered (after the client's retries) while the close
/// waits for it fails the close with `EIO` at once: asking the store again would make the
/// close wait as long once more. The copy stays the writer's: the next close commits it.
#[test]
fn a_close_that_waited_for_an_unanswered_early_upload_fails_without_asking_again() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    let old = pattern(3 * PART, 5);
    write(a.store.as_ref(), "f", &old).unwrap();
    for op in [Op::CreateUpload, Op::UploadPart] {
        client.reset_counts();
        let base = a.store.open(p("f")).unwrap();
        let copy = a.store.working_copy(p("f")).unwrap();
        // Slow, then unavailable: the close comes while the early request is under way.
        client.delay(op, Duration::from_millis(300));
        client.fail(op, None, Failure::Unavailable, 100);
        copy.write_at(&pattern(3 * PART, 6), 0).unwrap();
        let e = commit_whole(a.store.as_ref(), "f", &base, &copy)
            .err()
            .unwrap();
        assert_eq!(e.raw_os_error(), libc::EIO, "{op:?}: {e}");
        assert!(format!("{e:#}").contains("early upload"), "{op:?}: {e:#}");
        assert!(e.is_transient(), "{op:?}: the store was unreachable");
        assert_eq!(
            client.count(Op::CreateUpload),
            1,
            "{op:?}: the commit made no upload of its own"
        );
        assert_eq!(client.object(&key("f")).unwrap(), old, "{op:?}");
        client.heal();
        let done = commit_whole(a.store.as_ref(), "f", &base, &copy).unwrap();
        assert_eq!(read(done.as_ref()), pattern(3 * PART, 6), "{op:?}");
        write(a.store.as_ref(), "f", &old).unwrap();
    }
}

/// A read of a version whose fetch found the store unavailable (after the client's retries)
/// makes other reads of it fail at once for a moment, rather than each waiting the whole
/// bound again (the kernel reads a page again right after a failed read); then it asks again.
#[test]
fn reads_just_after_the_store_did_not_answer_fail_at_once() {
    let client = Arc::new(MemClient::new());
    let (a, b) = uncached_hosts(&client);
    let data = pattern(2 * MIB, 9);
    write(a.store.as_ref(), "f", &data).unwrap();
    let content = b.store.open(p("f")).unwrap();
    client.reset_counts();
    client.fail(Op::Get, None, Failure::Unavailable, 1);
    let mut buf = vec![0u8; 4096];
    assert!(content.read_at(&mut buf, 0).is_err());
    let asked = client.count(Op::Get);
    assert!(asked >= 1);
    let e = content.read_at(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains("not asked again"), "{e}");
    assert_eq!(client.count(Op::Get), asked, "not asked again at once");
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(content.read_at(&mut buf, 0).unwrap(), 4096);
    assert_eq!(buf[..], data[..4096]);
}

#[test]
fn random_writes_into_a_large_file_copy_the_untouched_parts() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    let old = pattern(4 * PART + 77, 5);
    write(a.store.as_ref(), "db", &old).unwrap();
    let base = a.store.open(p("db")).unwrap();
    let copy = a.store.working_copy(p("db")).unwrap();
    copy.set_len(old.len() as u64).unwrap();
    // Only what the writer wrote is in the copy (seeded on demand).
    copy.write_at(b"PAGE", 2 * PART + 4096).unwrap();
    let written = [(2 * PART + 4096, 4u64)];
    let completed = std::sync::atomic::AtomicBool::new(false);
    let complete = || {
        completed.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    };
    client.reset_counts();
    a.store
        .commit(CommitRequest {
            path: p("db"),
            base: &base,
            change: Change::Ranges {
                copy: &copy,
                written: &written,
                complete: &complete,
            },
            durable: false,
            attrs: None,
        })
        .unwrap();
    let mut want = old.clone();
    want[2 * PART as usize + 4096..2 * PART as usize + 4100].copy_from_slice(b"PAGE");
    assert_eq!(client.object(&key("db")).unwrap(), want);
    assert_eq!(client.count(Op::UploadPartCopy), 4, "the untouched parts");
    assert_eq!(client.count(Op::UploadPart), 1, "the part written");
    assert!(!completed.load(std::sync::atomic::Ordering::Relaxed));
    // If the version it started from is gone, the copy is completed and wins whole.
    let base = a.store.open(p("db")).unwrap();
    let copy = a.store.working_copy(p("db")).unwrap();
    copy.set_len(want.len() as u64).unwrap();
    copy.write_at(b"MINE", 0).unwrap();
    let b = host(&client);
    write(b.store.as_ref(), "db", &pattern(4 * PART + 77, 6)).unwrap();
    let complete = || {
        completed.store(true, std::sync::atomic::Ordering::Relaxed);
        copy.write_at(&want[4..], 4)
    };
    a.store
        .commit(CommitRequest {
            path: p("db"),
            base: &base,
            change: Change::Ranges {
                copy: &copy,
                written: &[(0, 4)],
                complete: &complete,
            },
            durable: false,
            attrs: None,
        })
        .unwrap();
    assert!(completed.load(std::sync::atomic::Ordering::Relaxed));
    let mut mine = want.clone();
    mine[..4].copy_from_slice(b"MINE");
    assert_eq!(client.object(&key("db")).unwrap(), mine);
    assert_eq!(client.upload_count(), 0);
}

#[test]
fn a_full_spool_is_enospc() {
    let client = Arc::new(MemClient::new());
    let mut config = config();
    config.spool_bytes = MIB;
    let a = host_with(&client, &config);
    let copy = a.store.working_copy(p("f")).unwrap();
    copy.write_at(&vec![1u8; MIB as usize], 0).unwrap();
    let e = copy.write_at(b"x", MIB).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    let other = a.store.working_copy(p("g")).unwrap();
    assert_eq!(
        other.write_at(b"x", 0).unwrap_err().raw_os_error(),
        Some(libc::ENOSPC)
    );
    // Room comes back when a copy shrinks or goes.
    copy.set_len(0).unwrap();
    other.write_at(b"x", 0).unwrap();
    drop(copy);
    drop(other);
    assert_eq!(a.spaces.shared().spool.used(), 0);
}

#[test]
fn a_crash_leaves_journaled_uploads_that_the_next_start_aborts() {
    let client = Arc::new(MemClient::new());
    let dir = tempfile::tempdir().unwrap();
    let config = config();
    let id = SpaceId::new(SpaceKind::Room, "r1").unwrap();
    {
        let spaces = open_with(client.clone(), &config, dir.path(), "memory".into()).unwrap();
        let store = spaces.open_space(&id, Some(None)).unwrap();
        store.create(p("big"), 0o644, None, false).unwrap();
        let copy = store.working_copy(p("big")).unwrap();
        copy.write_at(&pattern(3 * PART, 7), 0).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while client.count(Op::UploadPart) < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(client.upload_count(), 1);
        // A kill -9: nothing is dropped, nothing aborted; the process's lock goes.
        std::mem::forget(copy);
        let shared: &Arc<Shared> = spaces.shared();
        let lock_dir = shared.state.spool_dir().parent().unwrap().to_path_buf();
        let journal: Vec<_> = std::fs::read_dir(lock_dir.join("journal"))
            .unwrap()
            .collect();
        assert_eq!(journal.len(), 1, "the upload is in the journal");
        crash(&lock_dir);
        std::mem::forget(store);
        std::mem::forget(spaces);
    }
    assert_eq!(client.upload_count(), 1);
    // Another host's upload is not this host's to abort.
    let theirs = client
        .create_upload(&key("theirs"), &Metadata::new())
        .unwrap();
    let _next = open_with(client.clone(), &config, dir.path(), "memory".into()).unwrap();
    let left = client.list_uploads("").unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].upload_id, theirs);
    assert_eq!(
        client.object(&key("big")).unwrap(),
        b"",
        "the previous version"
    );
}

/// Releases the lock of a process directory of the local state, as its process's death would.
fn crash(proc_dir: &Path) {
    // The lock is held through an open descriptor: a new file in its place is unlocked.
    let lock = proc_dir.join("lock");
    std::fs::remove_file(&lock).unwrap();
    std::fs::File::create(&lock).unwrap();
}

/// Renames the directory `from` to `to` on a host of its own, cut short by a failed
/// DeleteMany (half done: `moved`, a file below `from`, is at both names), then crashes it and
/// starts it again (which finishes the rename).
fn rename_cut_short_by_a_crash(client: &Arc<MemClient>, from: &str, to: &str, moved: &str) {
    let dir = tempfile::tempdir().unwrap();
    let id = SpaceId::new(SpaceKind::Room, "r1").unwrap();
    {
        let spaces = open_with(client.clone(), &config(), dir.path(), "memory".into()).unwrap();
        let store = spaces.open_space(&id, None).unwrap();
        client.fail(Op::DeleteMany, None, Failure::Unavailable, 1);
        let e = store
            .rename(p(from), p(to), RenameMode::Replace)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), libc::EIO);
        assert!(client.object(&key(&format!("{to}/{moved}"))).is_some());
        assert!(client.object(&key(&format!("{from}/{moved}"))).is_some());
        crash(spaces.shared().state.spool_dir().parent().unwrap());
        std::mem::forget(store);
        std::mem::forget(spaces);
    }
    let _next = open_with(client.clone(), &config(), dir.path(), "memory".into()).unwrap();
}

#[test]
fn a_rename_that_failed_part_way_is_finished_before_anything_touches_its_names() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    let s = a.store.as_ref();
    a.store.mkdir(p("t4"), 0o755, None).unwrap();
    for i in 0..3 {
        write(s, &format!("t4/f{i}"), &[i as u8]).unwrap();
    }
    write(s, "other", b"o").unwrap();
    // The store fails the deletes: the copies are made, the old names stay.
    client.fail(Op::DeleteMany, None, Failure::Unavailable, 1000);
    let eio = |r: StoreResult<crate::store::Meta>| r.map(|_| ()).unwrap_err().raw_os_error();
    assert_eq!(
        s.rename(p("t4"), p("t5"), RenameMode::Replace)
            .unwrap_err()
            .raw_os_error(),
        libc::EIO
    );
    assert!(client.object(&key("t5/f1")).is_some() && client.object(&key("t4/f1")).is_some());
    // Both names, and what is below them, are refused while it cannot be finished (what
    // `mv` does next — a rename into the target directory it finds — included); the rest of
    // the space is not.
    assert_eq!(eio(s.stat(p("t5"))), libc::EIO);
    assert_eq!(eio(s.stat(p("t4/f0"))), libc::EIO);
    assert_eq!(
        s.rename(p("t4"), p("t5/t4"), RenameMode::Replace)
            .unwrap_err()
            .raw_os_error(),
        libc::EIO
    );
    assert!(s.list(p("t5")).is_err());
    assert_eq!(s.stat(p("other")).unwrap().size, 1);
    assert!(
        s.stat(p("t50"))
            .is_err_and(|e| e.raw_os_error() == libc::ENOENT)
    );
    // The store answers again: the next operation on a name finishes the rename first.
    client.heal();
    std::thread::sleep(super::UNFINISHED_RETRY);
    assert_eq!(s.stat(p("t5")).unwrap().kind, Kind::Dir);
    assert_eq!(
        s.stat(p("t4")).unwrap_err().raw_os_error(),
        libc::ENOENT,
        "moved whole"
    );
    assert!(client.keys().iter().all(|k| !k.starts_with(&key("t4/"))));
    assert_eq!(s.list(p("t5")).unwrap().len(), 3);
    assert_eq!(
        s.rename(p("t4"), p("t5/t4"), RenameMode::Replace)
            .unwrap_err()
            .raw_os_error(),
        libc::ENOENT,
        "not nested"
    );
    // Nothing is left for a restart to replay.
    assert_eq!(journaled(&a), 0);

    // A file rename cut between its copy and its delete: the janitor finishes it unasked.
    client.fail(Op::Delete, Some("other"), Failure::Unavailable, 1);
    assert_eq!(
        s.rename(p("other"), p("moved"), RenameMode::Replace)
            .unwrap_err()
            .raw_os_error(),
        libc::EIO
    );
    assert!(client.object(&key("other")).is_some());
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.object(&key("other")).is_some() {
        assert!(Instant::now() < deadline, "the janitor finishes it");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(client.object(&key("moved")).unwrap(), b"o");
    assert_eq!(s.stat(p("moved")).unwrap().size, 1);
    assert_eq!(s.stat(p("other")).unwrap_err().raw_os_error(), libc::ENOENT);
}

#[test]
fn a_directory_rename_moves_every_object_and_a_crash_is_finished_at_the_next_start() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    a.store.mkdir(p("d"), 0o700, None).unwrap();
    a.store.mkdir(p("d/sub"), 0o755, None).unwrap();
    a.store.mkdir(p("d/empty"), 0o755, None).unwrap();
    for i in 0..5 {
        write(a.store.as_ref(), &format!("d/sub/f{i}"), &[i as u8]).unwrap();
    }
    a.store.create(p("d/odd"), 0o600, None, true).unwrap();
    a.store.rename(p("d"), p("e"), RenameMode::Replace).unwrap();
    assert!(client.keys().iter().all(|k| !k.starts_with(&key("d/"))));
    assert_eq!(client.object(&key("e/sub/f3")).unwrap(), [3]);
    assert_eq!(
        a.store.stat(p("e")).unwrap().perm,
        0o700,
        "its mode moved along"
    );
    assert_eq!(a.store.stat(p("e/odd")).unwrap().perm, 0o600);
    assert_eq!(a.store.stat(p("e/empty")).unwrap().kind, Kind::Dir);
    let b = host(&client);
    let names: Vec<_> = b
        .store
        .list(p("e"))
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(b.store.list(p("e/odd").parent().unwrap()).unwrap().len(), 3);

    // A rename cut short by a failure, then a crash: the next start finishes it.
    rename_cut_short_by_a_crash(&client, "e", "g", "sub/f1");
    assert!(
        client.keys().iter().all(|k| !k.starts_with(&key("e/"))),
        "{:?}",
        client.keys()
    );
    assert_eq!(client.object(&key("g/sub/f1")).unwrap(), [1]);
    let c = host(&client);
    assert_eq!(
        c.store.stat(p("g")).unwrap().perm,
        0o700,
        "its index entry moved"
    );
    assert_eq!(
        c.store.stat(p("e")).unwrap_err().raw_os_error(),
        libc::ENOENT
    );
}

/// A rename cut short by a crash, then another host works in the old directory before this
/// host starts again: finishing the rename would carry that work off (and over what is at the
/// new name), so it is left as it is (and logged).
#[test]
fn an_interrupted_rename_is_not_finished_over_later_work() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    a.store.mkdir(p("d"), 0o755, None).unwrap();
    for i in 0..3 {
        write(a.store.as_ref(), &format!("d/f{i}"), &[i as u8]).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let id = SpaceId::new(SpaceKind::Room, "r1").unwrap();
    {
        let spaces = open_with(client.clone(), &config(), dir.path(), "memory".into()).unwrap();
        let store = spaces.open_space(&id, None).unwrap();
        client.fail(Op::DeleteMany, None, Failure::Unavailable, 1);
        store
            .rename(p("d"), p("e"), RenameMode::Replace)
            .unwrap_err();
        let proc_dir = spaces
            .shared()
            .state
            .spool_dir()
            .parent()
            .unwrap()
            .to_path_buf();
        // The rename began a minute ago, as far as its record says.
        let minute_ago = SystemTime::now() - std::time::Duration::from_secs(60);
        for entry in std::fs::read_dir(proc_dir.join("journal")).unwrap() {
            let file = std::fs::File::options()
                .write(true)
                .open(entry.unwrap().path())
                .unwrap();
            file.set_modified(minute_ago).unwrap();
        }
        crash(&proc_dir);
        std::mem::forget(store);
        std::mem::forget(spaces);
    }
    // Meanwhile another host writes into the old directory.
    write(a.store.as_ref(), "d/new-work", b"theirs").unwrap();
    let _next = open_with(client.clone(), &config(), dir.path(), "memory".into()).unwrap();
    assert_eq!(client.object(&key("d/new-work")).unwrap(), b"theirs");
    assert!(client.object(&key("e/new-work")).is_none());
    assert_eq!(client.object(&key("d/f1")).unwrap(), [1]);
}

/// Renames the file `from` to `to` on a host of its own, with `op` failing once (the copy or
/// the delete: the rename fails with `EIO`), then crashes that host, runs `meanwhile` and
/// starts it again (which finishes the rename if it finds it half done).
fn file_rename_cut_short_by_a_crash(
    client: &Arc<MemClient>,
    (from, to): (&str, &str),
    op: Op,
    meanwhile: impl FnOnce(),
) {
    let dir = tempfile::tempdir().unwrap();
    let id = SpaceId::new(SpaceKind::Room, "r1").unwrap();
    {
        let spaces = open_with(client.clone(), &config(), dir.path(), "memory".into()).unwrap();
        let store = spaces.open_space(&id, None).unwrap();
        store.stat(p(from)).unwrap();
        let _ = store.stat(p(to));
        client.fail(op, None, Failure::Unavailable, 1);
        let e = store
            .rename(p(from), p(to), RenameMode::Replace)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), libc::EIO);
        crash(spaces.shared().state.spool_dir().parent().unwrap());
        std::mem::forget(store);
        std::mem::forget(spaces);
    }
    meanwhile();
    let _next = open_with(client.clone(), &config(), dir.path(), "memory".into()).unwrap();
}

/// The attributes a listing of the root shows for `name` (from its index entry).
fn listed_perm(store: &dyn Store, name: &str) -> Option<u16> {
    store
        .list(p(""))
        .unwrap()
        .into_iter()
        .find(|e| e.name == name)
        .and_then(|e| e.meta)
        .map(|m| m.perm)
}

/// A file rename is a copy, then a delete: cut between them (a failed delete, then a crash),
/// the file is at both names; the next start deletes the source, still the version renamed,
/// and its attributes' entry in the listing moves with it.
#[test]
fn a_file_rename_cut_short_by_a_crash_is_finished_at_the_next_start() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    a.store.create(p("f"), 0o600, None, false).unwrap();
    write(a.store.as_ref(), "f", b"mine").unwrap();
    write(a.store.as_ref(), "g", b"old target").unwrap();
    assert_eq!(listed_perm(a.store.as_ref(), "f"), Some(0o600));
    file_rename_cut_short_by_a_crash(&client, ("f", "g"), Op::Delete, || {
        assert!(client.object(&key("f")).is_some(), "at both names");
    });
    assert!(client.object(&key("f")).is_none(), "{:?}", client.keys());
    assert_eq!(client.object(&key("g")).unwrap(), b"mine");
    let b = host(&client);
    assert_eq!(listed_perm(b.store.as_ref(), "g"), Some(0o600));
    assert_eq!(listed_perm(b.store.as_ref(), "f"), None);
    assert_eq!(
        b.store.stat(p("f")).unwrap_err().raw_os_error(),
        libc::ENOENT
    );
}

/// What a crashed file rename leaves is finished only where the copy was made and the source
/// is still the version renamed: a copy that failed leaves both files as they were (over a
/// target or not), and a source another host rewrote since stays.
#[test]
fn an_interrupted_file_rename_is_not_finished_where_it_did_not_copy_or_the_source_changed() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    write(a.store.as_ref(), "f", b"source").unwrap();
    write(a.store.as_ref(), "g", b"target").unwrap();
    // The copy failed: over a target, and to a new name.
    file_rename_cut_short_by_a_crash(&client, ("f", "g"), Op::Copy, || {});
    assert_eq!(client.object(&key("f")).unwrap(), b"source");
    assert_eq!(client.object(&key("g")).unwrap(), b"target");
    file_rename_cut_short_by_a_crash(&client, ("f", "new"), Op::Copy, || {});
    assert_eq!(client.object(&key("f")).unwrap(), b"source");
    assert!(client.object(&key("new")).is_none());
    // Copied, then another host rewrote the source before this one started again.
    file_rename_cut_short_by_a_crash(&client, ("f", "h"), Op::Delete, || {
        write(a.store.as_ref(), "f", b"rewritten").unwrap();
    });
    assert_eq!(client.object(&key("f")).unwrap(), b"rewritten");
    assert_eq!(client.object(&key("h")).unwrap(), b"source");
}

#[test]
fn hostile_names_from_the_bucket_are_not_shown_and_bad_names_never_made() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    write(a.store.as_ref(), "ok", b"1").unwrap();
    for k in ["a\\b", "d//x", "./y", "../z", "\0nul", ".roomfs-attrs/x"] {
        client.insert(&key(k), b"evil", Metadata::new());
    }
    client.insert(
        &key("bad-meta"),
        b"",
        [("mode".into(), "99999999999".into())].into(),
    );
    let b = host(&client);
    let mut names: Vec<String> = b
        .store
        .list(p(""))
        .unwrap()
        .into_iter()
        .map(|e| e.name.to_string_lossy().into_owned())
        .collect();
    names.sort();
    // `d//x` makes a directory `d` whose one entry has an empty name: `d` shows, empty.
    assert_eq!(names, ["bad-meta", "d", "ok"]);
    assert!(b.store.list(p("d")).unwrap().is_empty());
    assert_eq!(b.store.stat(p("bad-meta")).unwrap().kind, Kind::File);
    for bad in ["a\\b", ".roomfs-attrs"] {
        assert_eq!(
            a.store
                .create(p(bad), 0o644, None, true)
                .unwrap_err()
                .raw_os_error(),
            libc::EINVAL,
            "{bad}"
        );
    }
}

#[test]
fn reads_are_ranged_and_a_replaced_version_is_not_mixed_in() {
    let client = Arc::new(MemClient::new());
    let mut config = config();
    config.cache_bytes = 4 * MIB; // objects over 1 MiB are read through windows
    let (a, b) = (host_with(&client, &config), host_with(&client, &config));
    let data = pattern(20 * MIB, 9);
    write(a.store.as_ref(), "big", &data).unwrap();
    let r = b.store.open(p("big")).unwrap();
    client.reset_counts();
    let mut buf = vec![0u8; 128 << 10];
    let mut at = 0;
    while at < 4 * MIB {
        let n = r.read_at(&mut buf, at).unwrap();
        assert_eq!(&buf[..n], &data[at as usize..at as usize + n]);
        at += n as u64;
    }
    let gets = client.count(Op::Get);
    assert!(gets <= 4, "read-ahead: {gets} requests for 32 reads");
    // Another writer replaces it: what was not read yet cannot be read (no mixing).
    write(a.store.as_ref(), "big", &pattern(20 * MIB, 10)).unwrap();
    let e = r.read_at(&mut buf, 18 * MIB).unwrap_err();
    assert!(e.to_string().contains("precondition"), "{e}");
    // A small object is fetched whole at its first read, and then survives a replacement.
    write(a.store.as_ref(), "small", b"version one").unwrap();
    let small = b.store.open(p("small")).unwrap();
    let mut two = [0u8; 3];
    small.read_at(&mut two, 0).unwrap();
    write(a.store.as_ref(), "small", b"version two").unwrap();
    assert_eq!(read(small.as_ref()), b"version one");
}

#[test]
fn attributes_live_in_metadata_and_explicit_times_are_kept() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    write(a.store.as_ref(), "f", b"data").unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_000_000_000, 123);
    a.store
        .set_attr(
            p("f"),
            &SetAttr {
                perm: Some(0o751),
                uid: Some(5),
                mtime: Some(TimeSpec::At(t)),
                ..Default::default()
            },
        )
        .unwrap();
    let m = client.metadata(&key("f")).unwrap();
    assert_eq!(m["mode"], (libc::S_IFREG | 0o751).to_string());
    assert_eq!(
        (m["uid"].as_str(), m["mtime"].as_str()),
        ("5", "1000000000.000000123")
    );
    let b = host(&client);
    let listed = b.store.list(p("")).unwrap();
    let f = listed
        .iter()
        .find(|e| e.name == "f")
        .unwrap()
        .meta
        .clone()
        .unwrap();
    assert_eq!((f.perm, f.uid, f.mtime), (0o751, 5, t));
    // A commit keeps mode and owner, and its mtime is the new object's own.
    write(a.store.as_ref(), "f", b"new data").unwrap();
    let c = host(&client);
    let m = c.store.stat(p("f")).unwrap();
    assert_eq!((m.perm, m.uid), (0o751, 5));
    assert_ne!(m.mtime, t);
    let listed = c.store.list(p("")).unwrap();
    let f = listed
        .iter()
        .find(|e| e.name == "f")
        .unwrap()
        .meta
        .clone()
        .unwrap();
    assert_eq!((f.perm, f.uid, f.mtime), (0o751, 5, m.mtime));
    // Objects written by other tools get the defaults. (Host c listed the directory within
    // its metadata TTL: it would not see a new name yet; a fresh host does.)
    client.insert(&key("foreign"), b"hello", Metadata::new());
    assert_eq!(
        c.store.stat(p("foreign")).unwrap_err().raw_os_error(),
        libc::ENOENT
    );
    let m = host(&client).store.stat(p("foreign")).unwrap();
    assert_eq!(
        (m.kind, m.perm, m.uid, m.size),
        (Kind::File, 0o644, 1000, 5)
    );
}

#[test]
fn a_store_ignoring_conditions_is_detected_and_names_are_checked_first() {
    let client = Arc::new(MemClient::new());
    client
        .ignore_conditions
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let a = host(&client);
    assert!(!a.store.capabilities().conditional_writes);
    a.store.create(p("x"), 0o644, None, true).unwrap();
    let b = host(&client);
    assert_eq!(
        b.store
            .create(p("x"), 0o644, None, true)
            .unwrap_err()
            .raw_os_error(),
        libc::EEXIST,
        "checked with a HEAD before writing"
    );
    let ok = Arc::new(MemClient::new());
    assert!(host(&ok).store.capabilities().conditional_writes);
    let _ = ok.put(
        "k",
        super::client::Body::empty(),
        &Metadata::new(),
        &Condition::None,
    );
}

#[test]
fn spaces_are_made_counted_and_deleted() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    a.store.mkdir(p("d"), 0o755, None).unwrap();
    write(a.store.as_ref(), "d/f", b"12345").unwrap();
    write(a.store.as_ref(), "g", b"12").unwrap();
    let id = SpaceId::new(SpaceKind::Room, "r1").unwrap();
    let usage = a.spaces.space_usage(&id).unwrap().unwrap();
    assert_eq!((usage.files, usage.bytes), (3, 7));
    assert_eq!(a.store.usage().unwrap().bytes, 7);
    let other = SpaceId::new(SpaceKind::Room, "nope").unwrap();
    assert!(a.spaces.space_usage(&other).unwrap().is_none());
    assert_eq!(
        a.spaces
            .open_space(&other, None)
            .err()
            .unwrap()
            .raw_os_error(),
        Some(libc::ENOENT)
    );
    let removed = a.spaces.delete_space(&id).unwrap();
    assert_eq!((removed.files, removed.bytes), (3, 7));
    assert!(client.keys().is_empty(), "{:?}", client.keys());
    // The owner of a new space is its root's.
    let s = a.spaces.open_space(&id, Some(Some((42, 43)))).unwrap();
    let root = s.stat(p("")).unwrap();
    assert_eq!((root.uid, root.gid, root.kind), (42, 43, Kind::Dir));
}

#[test]
fn a_reader_reads_on_into_appends_of_its_version() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    a.store.create(p("log"), 0o644, None, true).unwrap();
    let base = a.store.open(p("log")).unwrap();
    let reader = b.store.open(p("log")).unwrap();
    let mut buf = [0u8; 64];
    // Read to its end right after it was opened (as the kernel reads a file's last page):
    // the store is not asked again.
    let heads = client.count(Op::Head);
    assert_eq!(reader.read_appended_at(&mut buf, 0).unwrap(), 0);
    assert_eq!(client.count(Op::Head), heads);
    let append = |base: &Arc<dyn Content>, tail: &[u8], follow| {
        a.store
            .commit(CommitRequest {
                path: p("log"),
                base,
                change: Change::Append { tail, follow },
                durable: false,
                attrs: None,
            })
            .unwrap()
            .content
    };
    let v1 = append(&base, b"one\n", false);
    std::thread::sleep(std::time::Duration::from_millis(250));
    let n = reader.read_appended_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"one\n", "another host's reader follows");
    let v2 = append(&v1, b"two\n", true);
    std::thread::sleep(std::time::Duration::from_millis(250));
    let n = reader.read_appended_at(&mut buf, 4).unwrap();
    assert_eq!(&buf[..n], b"two\n");
    // A rewrite starts a new lineage: readers stop at their version's end.
    write(a.store.as_ref(), "log", b"rewritten, longer than before\n").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(250));
    assert_eq!(reader.read_appended_at(&mut buf, 8).unwrap(), 0);
    let _ = v2;
}

/// A reader at its version's end reads on into an append as soon as this host has told of the
/// longer file (the kernel then reads up to that size, and a read answered short there is
/// zeros in its page cache), not only once its last ask for a newer version is 200 ms old.
#[test]
fn a_reader_reads_on_at_once_into_a_size_this_host_has_told() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    write(a.store.as_ref(), "log", b"start\n").unwrap();
    // (Fetched whole at its open: its version stays readable after it is replaced.)
    let reader = b.store.open_to_read(p("log")).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(reader.read_appended_at(&mut buf, 0).unwrap(), 6);
    assert_eq!(reader.read_appended_at(&mut buf, 6).unwrap(), 0);
    let base = a.store.open(p("log")).unwrap();
    commit_append(a.store.as_ref(), "log", &base, b"more\n", true).unwrap();
    // B hears of the change and tells the kernel the new size (a `stat`).
    b.store.forget(p("log"), false);
    assert_eq!(b.store.stat(p("log")).unwrap().size, 11);
    let n = reader.read_appended_at(&mut buf, 6).unwrap();
    assert_eq!(&buf[..n], b"more\n");
    // And a read across the version's end (a page the kernel reads again) goes on into it.
    let n = reader.read_appended_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"start\nmore\n");
}

/// Readers of two logs that began with the same bytes (so the same ETag: the MD5 of a single
/// PUT) each read on into their own log's appends. The lineage learnt of one file's version
/// was taken for the other's, and one reader stopped (a mount read zeros there).
#[test]
fn readers_of_two_logs_with_the_same_bytes_each_follow_their_own() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    // (In this order, each host's last word on the ETag is the other file's lineage.)
    for name in ["two.log", "one.log"] {
        write(a.store.as_ref(), name, b"start\n").unwrap();
    }
    let lineage = |name| client.metadata(&key(name)).unwrap()[super::LINEAGE].clone();
    assert_ne!(lineage("one.log"), lineage("two.log"));
    let mut buf = [0u8; 64];
    let readers = ["one.log", "two.log"].map(|name| {
        let r = b.store.open(p(name)).unwrap();
        assert_eq!(r.read_appended_at(&mut buf, 0).unwrap(), 6);
        r
    });
    for name in ["one.log", "two.log"] {
        let base = a.store.open(p(name)).unwrap();
        commit_append(a.store.as_ref(), name, &base, name.as_bytes(), true).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(250));
    for (r, name) in readers.iter().zip(["one.log", "two.log"]) {
        let n = r.read_appended_at(&mut buf, 6).unwrap();
        assert_eq!(&buf[..n], name.as_bytes(), "{name}'s reader");
    }
}

/// `tail -f` on another host: the kernel reads a growing file's pages again from the start,
/// and the version the reader opened is gone by then; the newer version begins with its bytes.
#[test]
fn a_reader_of_a_version_appended_to_elsewhere_reads_its_bytes_from_the_newer_one() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    write(a.store.as_ref(), "log", b"start\n").unwrap();
    let reader = b.store.open(p("log")).unwrap();
    let mut buf = [0u8; 64];
    let n = reader.read_appended_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"start\n");
    let base = a.store.open(p("log")).unwrap();
    let v1 = commit_append(a.store.as_ref(), "log", &base, b"one\n", true).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(250));
    let n = reader.read_appended_at(&mut buf, 6).unwrap();
    assert_eq!(&buf[..n], b"one\n");
    commit_append(a.store.as_ref(), "log", &v1, b"two\n", true).unwrap();
    let n = reader.read_appended_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"start\none\ntwo\n");
    // A rewrite keeps nothing of the version: its bytes are gone (EIO at the mount).
    write(a.store.as_ref(), "log", b"rewritten\n").unwrap();
    let other = b.store.open(p("log")).unwrap();
    write(a.store.as_ref(), "log", b"rewritten again\n").unwrap();
    assert!(other.read_appended_at(&mut buf, 0).is_err());
}

/// Commits `tail` appended to `base` (a close of a handle that wrote at the end).
fn commit_append(
    store: &dyn Store,
    path: &str,
    base: &Arc<dyn Content>,
    tail: &[u8],
    follow: bool,
) -> StoreResult<Arc<dyn Content>> {
    Ok(store
        .commit(CommitRequest {
            path: p(path),
            base,
            change: Change::Append { tail, follow },
            durable: false,
            attrs: None,
        })?
        .content)
}

#[test]
fn a_file_an_open_creates_is_made_by_its_commit_in_one_put() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    assert!(a.store.capabilities().created_at_commit);
    client.reset_counts();
    a.store.create_held(p("new"), 0o644, None).unwrap();
    assert_eq!(
        client.count(Op::Put),
        0,
        "nothing is written before the commit"
    );
    // This host shows it; others see it from its commit on.
    assert_eq!(a.store.stat(p("new")).unwrap().size, 0);
    assert!(a.store.list(p("")).unwrap().iter().any(|e| e.name == "new"));
    let errno = |r: StoreResult<_>| {
        r.map(|_: crate::store::Meta| ())
            .unwrap_err()
            .raw_os_error()
    };
    assert_eq!(errno(b.store.stat(p("new"))), libc::ENOENT);
    assert_eq!(
        errno(a.store.create_held(p("new"), 0o644, None)),
        libc::EEXIST
    );
    assert_eq!(
        errno(a.store.create(p("new"), 0o644, None, true)),
        libc::EEXIST
    );
    let base = a.store.open(p("new")).unwrap();
    commit_append(a.store.as_ref(), "new", &base, b"hello", false).unwrap();
    assert_eq!(
        client.count(Op::Put),
        1,
        "one PUT makes the file with its bytes"
    );
    assert_eq!(client.object(&key("new")).unwrap(), b"hello");
    // (B remembers it absent for its metadata TTL; a host that looks now sees it.)
    assert_eq!(host(&client).store.stat(p("new")).unwrap().size, 5);

    // Created and closed empty (`touch`): the commit makes the empty object.
    a.store.create_held(p("empty"), 0o644, None).unwrap();
    let base = a.store.open(p("empty")).unwrap();
    commit_append(a.store.as_ref(), "empty", &base, b"", false).unwrap();
    assert_eq!(client.object(&key("empty")).unwrap(), b"");

    // Unlinked before its commit (whose changes the core then drops): nothing is made.
    a.store.create_held(p("gone"), 0o644, None).unwrap();
    a.store.unlink(p("gone")).unwrap();
    assert_eq!(errno(a.store.stat(p("gone"))), libc::ENOENT);
    assert!(client.object(&key("gone")).is_none());

    // Renamed, or its mode changed, before its commit: made first; the commit lands where
    // the file is then.
    a.store.create_held(p("tmp"), 0o644, None).unwrap();
    let base = a.store.open(p("tmp")).unwrap();
    a.store
        .rename(p("tmp"), p("final"), RenameMode::Replace)
        .unwrap();
    commit_append(a.store.as_ref(), "final", &base, b"data", false).unwrap();
    assert_eq!(client.object(&key("final")).unwrap(), b"data");
    assert!(client.object(&key("tmp")).is_none());
    a.store.create_held(p("x"), 0o644, None).unwrap();
    let attr = SetAttr {
        perm: Some(0o600),
        ..SetAttr::default()
    };
    a.store.set_attr(p("x"), &attr).unwrap();
    assert_eq!(host(&client).store.stat(p("x")).unwrap().perm, 0o600);

    // A directory holding a file not committed yet is not empty.
    a.store.mkdir(p("d"), 0o755, None).unwrap();
    a.store.create_held(p("d/f"), 0o644, None).unwrap();
    assert_eq!(
        a.store.rmdir(p("d")).unwrap_err().raw_os_error(),
        libc::ENOTEMPTY
    );

    // Another host made the name meanwhile: a writer's close replaces it whole (the last close
    // wins), an appender's bytes go after theirs.
    a.store.create_held(p("w"), 0o644, None).unwrap();
    let base = a.store.open(p("w")).unwrap();
    write(b.store.as_ref(), "w", b"theirs").unwrap();
    commit_append(a.store.as_ref(), "w", &base, b"mine", false).unwrap();
    assert_eq!(client.object(&key("w")).unwrap(), b"mine");
    a.store.create_held(p("log"), 0o644, None).unwrap();
    let base = a.store.open(p("log")).unwrap();
    write(b.store.as_ref(), "log", b"theirs\n").unwrap();
    commit_append(a.store.as_ref(), "log", &base, b"mine\n", true).unwrap();
    assert_eq!(client.object(&key("log")).unwrap(), b"theirs\nmine\n");
    assert_eq!(a.store.stat(p("log")).unwrap().size, 12);

    // The store failed its first commit (a request may have timed out and landed later):
    // what is there is the store's to say from then on, not this host's memory of the create
    // (which showed the file empty for as long as the mount lived).
    a.store.create_held(p("lost"), 0o644, None).unwrap();
    let base = a.store.open(p("lost")).unwrap();
    client.fail(Op::Put, Some("/lost"), Failure::Unavailable, 100);
    let failed = commit_append(a.store.as_ref(), "lost", &base, b"data", false);
    assert_eq!(failed.map(|_| ()).unwrap_err().raw_os_error(), libc::EIO);
    client.heal();
    assert_eq!(errno(a.store.stat(p("lost"))), libc::ENOENT);
    // Another host made a name this host created and has not committed yet: once heard of,
    // the name shows theirs.
    a.store.create_held(p("heard"), 0o644, None).unwrap();
    write(b.store.as_ref(), "heard", b"theirs").unwrap();
    assert_eq!(a.store.stat(p("heard")).unwrap().size, 0);
    a.store.forget(p("heard"), false);
    assert_eq!(a.store.stat(p("heard")).unwrap().size, 6);
}

#[test]
fn a_sequential_reader_of_a_large_object_streams_it_through_memory() {
    let client = Arc::new(MemClient::new());
    let mut config = config();
    config.cache_bytes = 512 * MIB; // objects up to 128 MiB could be cached
    let (a, b) = (host_with(&client, &config), host_with(&client, &config));
    let data = pattern(64 * MIB, 3);
    write(a.store.as_ref(), "big", &data).unwrap();
    let r = b.store.open(p("big")).unwrap();
    client.reset_counts();
    let mut buf = vec![0u8; 128 << 10];
    let mut at = 0;
    while at < data.len() as u64 {
        let n = r.read_at(&mut buf, at).unwrap();
        assert!(n > 0);
        assert!(buf[..n] == data[at as usize..at as usize + n], "at {at}");
        at += n as u64;
    }
    // Through windows that grow ahead of it (up to 16 MiB a request), not 1 MiB chunks...
    let gets = client.count(Op::Get);
    assert!(gets <= 12, "{gets} requests for 64 MiB");
    // ...and not through the cache file, which holds only the first read's chunk.
    assert!(
        b.spaces.shared().cache.used() <= MIB,
        "{} bytes cached",
        b.spaces.shared().cache.used()
    );
    // A reader jumping around is served through the cache, as before.
    let r = b.store.open(p("big")).unwrap();
    for at in [40 * MIB, 3 * MIB, 50 * MIB] {
        let n = r.read_at(&mut buf, at).unwrap();
        assert!(buf[..n] == data[at as usize..at as usize + n]);
    }
    assert!(b.spaces.shared().cache.used() >= 3 * MIB);
}

#[test]
fn a_file_keeps_the_times_its_host_gave_it_when_the_store_is_asked_again() {
    let client = Arc::new(MemClient::new());
    // The store stamps `Last-Modified` by its own clock, here 30 s behind the hosts'.
    client
        .clock_behind_secs
        .store(30, std::sync::atomic::Ordering::Relaxed);
    let mut config = config();
    config.metadata_ttl_secs = 0.0; // every stat and listing asks the store
    let (a, b) = (host_with(&client, &config), host_with(&client, &config));
    write(a.store.as_ref(), "f", b"data").unwrap();
    let made = a.store.stat(p("f")).unwrap();
    let now = SystemTime::now();
    assert!(made.mtime <= now && made.mtime + Duration::from_secs(2) > now);
    // To the nanosecond, as a local disk keeps it: `make` compares a target made and a source
    // edited within one second.
    let nanos = |t: SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    };
    assert_ne!(nanos(made.mtime), 0, "{:?}", made.mtime);
    // Asked again (HEAD, LIST): the same times on this host, whatever the store's clock says.
    let again = a.store.stat(p("f")).unwrap();
    assert_eq!((again.mtime, again.ctime), (made.mtime, made.ctime));
    let listed = a.store.list(p("")).unwrap();
    let entry = listed.iter().find(|e| e.name == "f").unwrap();
    assert_eq!(entry.meta.as_ref().unwrap().mtime, made.mtime);
    // Another host sees the store's time, and so does this one for the other's version.
    let theirs = b.store.stat(p("f")).unwrap();
    assert!(theirs.mtime + Duration::from_secs(20) < made.mtime);
    write(b.store.as_ref(), "f", b"theirs").unwrap();
    let (at_a, at_b) = (a.store.stat(p("f")).unwrap(), b.store.stat(p("f")).unwrap());
    assert!(at_a.mtime + Duration::from_secs(20) < at_b.mtime);
    assert!(at_b.mtime >= made.mtime);
    // The same bytes written again by the other host (the same ETag, a later
    // `Last-Modified`) have the other host's time on this one too.
    write(a.store.as_ref(), "same", b"same bytes").unwrap();
    let mine = a.store.stat(p("same")).unwrap();
    // (By the store's clock, 10 s later.)
    client
        .clock_behind_secs
        .store(20, std::sync::atomic::Ordering::Relaxed);
    write(b.store.as_ref(), "same", b"same bytes").unwrap();
    let theirs = b.store.stat(p("same")).unwrap();
    assert_eq!(
        theirs.version, mine.version,
        "the ETag is the MD5 of the bytes"
    );
    let listed = a.store.list(p("")).unwrap();
    let entry = listed.iter().find(|e| e.name == "same").unwrap();
    for seen in [
        a.store.stat(p("same")).unwrap(),
        entry.meta.clone().unwrap(),
    ] {
        assert_eq!(
            seen.mtime,
            to_second(client.head(&key("same")).unwrap().last_modified)
        );
    }
    // Told of the other host's change (the change feed), this host forgets its own time
    // even if it never asked the store for its version.
    client
        .clock_behind_secs
        .store(30, std::sync::atomic::Ordering::Relaxed);
    write(a.store.as_ref(), "told", b"told").unwrap();
    client
        .clock_behind_secs
        .store(20, std::sync::atomic::Ordering::Relaxed);
    write(b.store.as_ref(), "told", b"told").unwrap();
    a.store.forget(p("told"), false);
    let told = a.store.stat(p("told")).unwrap();
    assert_eq!(
        told.mtime,
        to_second(client.head(&key("told")).unwrap().last_modified)
    );
}

#[test]
fn a_rename_keeps_the_mtime_of_a_file_not_written_just_now() {
    use std::sync::atomic::Ordering::Relaxed;
    let client = Arc::new(MemClient::new());
    let (a, b) = uncached_hosts(&client);
    // A file the other host wrote a minute ago, by the store's clock, which is 30 s behind
    // the hosts' from then on.
    client.clock_behind_secs.store(60, Relaxed);
    write(b.store.as_ref(), "old", b"data").unwrap();
    client.clock_behind_secs.store(30, Relaxed);
    let before = a.store.stat(p("old")).unwrap();
    a.store
        .rename(p("old"), p("moved"), RenameMode::Replace)
        .unwrap();
    // On both hosts, by HEAD and by a listing: the mtime it had; the ctime is the rename's
    // (on the renaming host by its clock, 30 s ahead of the store's).
    assert!(a.store.stat(p("moved")).unwrap().ctime > before.ctime + Duration::from_secs(20));
    for host in [&a, &b] {
        let m = host.store.stat(p("moved")).unwrap();
        assert_eq!(m.mtime, before.mtime);
        let listed = host.store.list(p("")).unwrap();
        let e = listed.iter().find(|e| e.name == "moved").unwrap();
        assert_eq!(e.meta.as_ref().unwrap().mtime, before.mtime);
    }
    assert_eq!(
        client.metadata(&key("moved")).unwrap()["mtime"],
        super::attrs::format_time(before.mtime)
    );
    // Written again, it has the new version's mtime (on the writing host, by its clock).
    write(b.store.as_ref(), "moved", b"new").unwrap();
    let m = b.store.stat(p("moved")).unwrap();
    assert!(m.mtime > before.mtime + Duration::from_secs(20));
    assert!(
        !client
            .metadata(&key("moved"))
            .unwrap()
            .contains_key("mtime")
    );

    // A file written just now (an atomic save's temporary file) takes the rename's time, by
    // this host's clock, and costs no index write.
    write(a.store.as_ref(), "tmp", b"saved").unwrap();
    let written = a.store.stat(p("tmp")).unwrap();
    let puts = client.count(Op::Put);
    a.store
        .rename(p("tmp"), p("saved"), RenameMode::Replace)
        .unwrap();
    assert_eq!(client.count(Op::Put), puts, "no index written");
    let m = a.store.stat(p("saved")).unwrap();
    assert!(m.mtime >= written.mtime && m.mtime < written.mtime + Duration::from_secs(3));
    assert!(
        !client
            .metadata(&key("saved"))
            .unwrap()
            .contains_key("mtime")
    );
}

#[test]
fn a_directory_rename_keeps_its_files_mtimes_and_a_crash_keeps_them_too() {
    use std::sync::atomic::Ordering::Relaxed;
    let client = Arc::new(MemClient::new());
    let (a, b) = uncached_hosts(&client);
    // Written a minute ago by the store's clock (behind the hosts' by 30 s from then on).
    client.clock_behind_secs.store(60, Relaxed);
    a.store.mkdir(p("d"), 0o755, None).unwrap();
    a.store.mkdir(p("d/sub"), 0o700, None).unwrap();
    // Names on both sides of the index's (`.roomfs-attrs`) in key order.
    for name in ["d/-first", "d/old", "d/sub/deep"] {
        write(b.store.as_ref(), name, name.as_bytes()).unwrap();
    }
    b.store.create(p("d/private"), 0o600, None, true).unwrap();
    write(b.store.as_ref(), "d/private", b"mine").unwrap();
    let set = std::time::UNIX_EPOCH + Duration::new(1_000_000_000, 5);
    write(a.store.as_ref(), "d/touched", b"as tar -x leaves it").unwrap();
    a.store
        .set_attr(
            p("d/touched"),
            &SetAttr {
                mtime: Some(TimeSpec::At(set)),
                ..Default::default()
            },
        )
        .unwrap();
    client.clock_behind_secs.store(30, Relaxed);
    write(a.store.as_ref(), "d/fresh", b"just written").unwrap();
    let names = ["-first", "old", "sub/deep", "private", "touched"];
    // As the renaming host shows them (the other host's files by the store's clock).
    let before: Vec<_> = names
        .iter()
        .map(|n| a.store.stat(&Path::new("d").join(n)).unwrap())
        .collect();
    let fresh = a.store.stat(p("d/fresh")).unwrap();
    assert_eq!(before[4].mtime, set);

    a.store.rename(p("d"), p("e"), RenameMode::Replace).unwrap();
    assert!(client.keys().iter().all(|k| !k.starts_with(&key("d/"))));
    let check = |root: &str, what: &str| {
        for host in [&a, &b] {
            for (n, was) in names.iter().zip(&before) {
                let path = Path::new(root).join(n);
                let m = host.store.stat(&path).unwrap();
                assert_eq!(
                    (m.mtime, m.perm),
                    (was.mtime, was.perm),
                    "{what}: HEAD of {n}"
                );
                let (dir, name) = (path.parent().unwrap(), path.file_name().unwrap());
                let listed = host.store.list(dir).unwrap();
                let e = listed.iter().find(|e| *e.name == *name).unwrap();
                let m = e.meta.as_ref().unwrap();
                assert_eq!(
                    (m.mtime, m.perm),
                    (was.mtime, was.perm),
                    "{what}: listing of {n}"
                );
            }
            let sub = host.store.stat(&Path::new(root).join("sub")).unwrap();
            assert_eq!(sub.perm, 0o700, "{what}");
        }
    };
    check("e", "renamed");
    assert_eq!(
        client.metadata(&key("e/old")).unwrap()["mtime"],
        super::attrs::format_time(before[1].mtime)
    );
    assert_eq!(client.metadata(&key("e/private")).unwrap()["uid"], "1000");
    // A file modified in the last two seconds takes the rename's time (as a file rename).
    let m = a.store.stat(p("e/fresh")).unwrap();
    assert!(m.mtime >= fresh.mtime && m.mtime < fresh.mtime + Duration::from_secs(3));

    // A rename cut short by a failure, then a crash: the next start finishes it, and the
    // files keep their mtimes there too.
    rename_cut_short_by_a_crash(&client, "e", "g", "old");
    assert!(client.keys().iter().all(|k| !k.starts_with(&key("e/"))));
    check("g", "finished at the next start");
}

#[test]
fn new_names_and_saves_by_rename_cost_no_lookups_and_stale_names_are_looked_up_again() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    a.store.mkdir(p("d"), 0o755, None).unwrap();
    // A directory just made is known empty: the names made in it are known to be free.
    let asked = client.count(Op::Head) + client.count(Op::List);
    assert_eq!(
        a.store.stat(p("d/old")).unwrap_err().raw_os_error(),
        libc::ENOENT
    );
    assert_eq!(client.count(Op::Head) + client.count(Op::List), asked);
    write(a.store.as_ref(), "d/old", b"old").unwrap();
    let requests = || -> Vec<u64> {
        [Op::Head, Op::List, Op::Copy, Op::Delete]
            .into_iter()
            .map(|op| client.count(op))
            .collect()
    };
    let since = |before: &[u64]| -> Vec<u64> {
        requests().iter().zip(before).map(|(x, y)| x - y).collect()
    };
    // A file written to a temporary name and renamed to a new one (as Python writes bytecode):
    // the store remembers both names (the kernel looks them up just before), so the rename is
    // a copy (made only if the name is still free) and a delete, and the directory's listing
    // stays known: the next new name is answered from it.
    write(a.store.as_ref(), "d/new.tmp", b"new").unwrap();
    let before = requests();
    a.store
        .rename(p("d/new.tmp"), p("d/new"), RenameMode::Replace)
        .unwrap();
    assert_eq!(
        a.store.stat(p("d/next.tmp")).unwrap_err().raw_os_error(),
        libc::ENOENT
    );
    assert_eq!(since(&before), [0, 0, 1, 1], "HEAD, LIST, copy, delete");
    assert_eq!(read(a.store.open(p("d/new")).unwrap().as_ref()), b"new");
    assert!(client.object(&key("d/new.tmp")).is_none());
    // Over a file that is there (an atomic save): that file is looked at afresh (one HEAD),
    // since its attributes decide what the directory's index must say of the name.
    let before = requests();
    a.store
        .rename(p("d/new"), p("d/old"), RenameMode::Replace)
        .unwrap();
    assert_eq!(since(&before), [1, 0, 1, 1], "HEAD, LIST, copy, delete");
    assert_eq!(client.object(&key("d/old")).unwrap(), b"new");
    // The source rewritten by another host since this one looked at it: the copy's condition
    // fails, and the rename looks it up again and moves the new version.
    a.store.stat(p("d/old")).unwrap();
    write(b.store.as_ref(), "d/old", b"theirs").unwrap();
    a.store
        .rename(p("d/old"), p("d/moved"), RenameMode::Replace)
        .unwrap();
    assert_eq!(client.object(&key("d/moved")).unwrap(), b"theirs");
    assert!(client.object(&key("d/old")).is_none());
    assert_eq!(
        a.store.stat(p("d/old")).unwrap_err().raw_os_error(),
        libc::ENOENT
    );
    // A target this host remembers absent, made meanwhile by another host with a mode of its
    // own: the copy is refused, and the rename looks again and replaces it, index entry and
    // all, so a listing and a HEAD agree on the mode.
    assert!(a.store.stat(p("d/late")).is_err());
    b.store.create(p("d/late"), 0o600, None, true).unwrap();
    write(b.store.as_ref(), "d/late", b"late").unwrap();
    a.store
        .rename(p("d/moved"), p("d/late"), RenameMode::Replace)
        .unwrap();
    assert_eq!(client.object(&key("d/late")).unwrap(), b"theirs");
    let c = host(&client);
    let head = c.store.stat(p("d/late")).unwrap().perm;
    let listed = c.store.list(p("d")).unwrap();
    let entry = listed.iter().find(|e| e.name == "late").unwrap();
    assert_eq!((head, entry.meta.as_ref().unwrap().perm), (0o644, 0o644));
}

#[test]
fn a_rename_that_writes_the_metadata_reads_it_afresh_and_reverts_no_other_hosts_chmod() {
    use std::sync::atomic::Ordering::Relaxed;
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    // Written a minute ago (by the store's clock): a rename keeps its mtime in the copy's
    // metadata, which it writes whole.
    client.clock_behind_secs.store(60, Relaxed);
    write(b.store.as_ref(), "f", b"data").unwrap();
    client.clock_behind_secs.store(0, Relaxed);
    assert_eq!(a.store.stat(p("f")).unwrap().perm, 0o644); // remembered by host a
    // Another host's chmod: a copy onto itself, which leaves the ETag as it was.
    b.store
        .set_attr(
            p("f"),
            &SetAttr {
                perm: Some(0o600),
                ..Default::default()
            },
        )
        .unwrap();
    a.store.rename(p("f"), p("g"), RenameMode::Replace).unwrap();
    assert_eq!(
        client.metadata(&key("g")).unwrap()["mode"],
        (libc::S_IFREG | 0o600).to_string()
    );
}

#[test]
fn removing_directories_one_after_the_other_asks_only_what_it_must() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    for d in ["objects/aa", "objects/ab", "objects/ac"] {
        a.store.mkdir(p(d).parent().unwrap(), 0o755, None).ok();
        a.store.mkdir(p(d), 0o755, None).unwrap();
        write(a.store.as_ref(), &format!("{d}/obj"), b"x").unwrap();
    }
    // As `git gc` prunes: list a directory, remove its file, remove it, look up the next.
    let requests = || -> Vec<u64> {
        [Op::Head, Op::List]
            .into_iter()
            .map(|op| client.count(op))
            .collect()
    };
    assert!(a.store.stat(p("objects/aa")).is_ok());
    a.store.unlink(p("objects/aa/obj")).unwrap();
    let before = requests();
    a.store.rmdir(p("objects/aa")).unwrap();
    assert_eq!(a.store.stat(p("objects/ab")).unwrap().kind, Kind::Dir);
    assert_eq!(
        a.store.stat(p("objects/aa")).unwrap_err().raw_os_error(),
        libc::ENOENT
    );
    let after = requests();
    // Only whether it was empty was asked (a LIST of it), always.
    assert_eq!((after[0] - before[0], after[1] - before[1]), (0, 1));
    // A directory that is not empty stays, whatever was remembered of it.
    assert_eq!(
        a.store.rmdir(p("objects/ab")).unwrap_err().raw_os_error(),
        libc::ENOTEMPTY
    );
    assert!(client.object(&key("objects/ab/obj")).is_some());
    // Another host sees it gone, and its neighbours there.
    let b = host(&client);
    let names: Vec<String> = b
        .store
        .list(p("objects"))
        .unwrap()
        .into_iter()
        .map(|e| e.name.to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["ab", "ac"]);
}

/// Listings show modes from the directory's index, written after the object: a change that
/// takes permissions from other users goes to the index first, so that no listing shows the
/// object with more than it grants — here, the object's write fails after the index's (as
/// when the host dies between the two).
#[test]
fn a_narrower_mode_reaches_the_listings_before_the_object() {
    let client = Arc::new(MemClient::new());
    let (a, b) = uncached_hosts(&client);
    let listed = |name: &str| {
        let entries = b.store.list(p("")).unwrap();
        let e = entries.iter().find(|e| e.name == name).unwrap();
        e.meta.as_ref().unwrap().perm
    };
    let chmod = |name: &str, perm: u16| {
        let attr = SetAttr {
            perm: Some(perm),
            ..Default::default()
        };
        a.store.set_attr(p(name), &attr).map(|m| m.perm)
    };
    write(a.store.as_ref(), "f", b"secret").unwrap();
    client.fail(Op::Copy, Some("/f"), Failure::Unavailable, 1);
    assert!(chmod("f", 0o600).is_err());
    assert_eq!(
        b.store.stat(p("f")).unwrap().perm,
        0o644,
        "the object as it was"
    );
    assert_eq!(listed("f"), 0o600, "the listing errs on the narrow side");
    // Widened again: the object first, then the index, which loses the entry.
    assert_eq!(chmod("f", 0o644).unwrap(), 0o644);
    assert_eq!(listed("f"), 0o644);
    assert_eq!(chmod("f", 0o600).unwrap(), 0o600);
    assert_eq!(
        (b.store.stat(p("f")).unwrap().perm, listed("f")),
        (0o600, 0o600)
    );
    // A widening change whose index write fails leaves the listing narrower too.
    client.fail(Op::Put, Some(".roomfs-attrs"), Failure::Unavailable, 1);
    assert!(chmod("f", 0o640).is_err());
    assert_eq!(
        (b.store.stat(p("f")).unwrap().perm, listed("f")),
        (0o640, 0o600)
    );
    // The same for a mode set while the file was being written (`install -m 600`), which
    // its commit writes.
    write(a.store.as_ref(), "g", b"old").unwrap();
    let base = a.store.open(p("g")).unwrap();
    let copy = a.store.working_copy(p("g")).unwrap();
    copy.write_at(b"new secret", 0).unwrap();
    client.fail(Op::Put, Some("/g"), Failure::Unavailable, 1);
    let failed = a.store.commit(CommitRequest {
        path: p("g"),
        base: &base,
        change: Change::Whole(&copy),
        durable: false,
        attrs: Some(SetAttr {
            perm: Some(0o600),
            ..Default::default()
        }),
    });
    assert!(failed.is_err());
    assert_eq!(b.store.stat(p("g")).unwrap().perm, 0o644);
    assert_eq!(listed("g"), 0o600);
}

#[test]
fn attributes_given_to_a_commit_go_into_its_object_and_its_listing_entry() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    let t = std::time::UNIX_EPOCH + Duration::new(1_000_000_000, 7);
    // As `tar -x` as root: made with O_EXCL, written, owner, mode and times, closed.
    a.store.create(p("f"), 0o600, None, true).unwrap();
    let base = a.store.open(p("f")).unwrap();
    let copy = a.store.working_copy(p("f")).unwrap();
    copy.write_at(b"data", 0).unwrap();
    let (puts, heads) = (client.count(Op::Put), client.count(Op::Head));
    let commit = |base: &Arc<dyn Content>, attrs: Option<SetAttr>| {
        a.store
            .commit(CommitRequest {
                path: p("f"),
                base,
                change: Change::Whole(&copy),
                durable: false,
                attrs,
            })
            .unwrap()
    };
    let done = commit(
        &base,
        Some(SetAttr {
            perm: Some(0o751),
            uid: Some(5),
            gid: Some(6),
            mtime: Some(TimeSpec::At(t)),
            ..Default::default()
        }),
    );
    let m = done.content.meta();
    assert_eq!((m.perm, m.uid, m.gid, m.mtime, m.size), (0o751, 5, 6, t, 4));
    // The object's PUT and its directory's index: no copy onto itself, no lookup.
    assert_eq!(client.count(Op::Copy), 0);
    assert_eq!(client.count(Op::Head) - heads, 0);
    assert_eq!(client.count(Op::Put) - puts, 2);
    let m = client.metadata(&key("f")).unwrap();
    assert_eq!(m["mode"], (libc::S_IFREG | 0o751).to_string());
    assert_eq!((m["uid"].as_str(), m["gid"].as_str()), ("5", "6"));
    // Another host sees them by a lookup and in a listing.
    let b = host(&client);
    let s = b.store.stat(p("f")).unwrap();
    assert_eq!((s.perm, s.uid, s.gid, s.mtime), (0o751, 5, 6, t));
    let listed = |h: &Host| {
        h.store
            .list(p(""))
            .unwrap()
            .into_iter()
            .find(|e| e.name == "f")
            .unwrap()
            .meta
            .unwrap()
    };
    let l = listed(&b);
    assert_eq!((l.perm, l.uid, l.gid, l.mtime), (0o751, 5, 6, t));
    // Back to the defaults: the listing follows.
    copy.write_at(b"DATA", 0).unwrap();
    commit(
        &done.content,
        Some(SetAttr {
            perm: Some(0o644),
            uid: Some(1000),
            gid: Some(1000),
            ..Default::default()
        }),
    );
    let l = listed(&host(&client));
    assert_eq!((l.perm, l.uid, l.gid), (0o644, 1000, 1000));
    assert_ne!(l.mtime, t);
    // `touch` (the time of the call): the version's own time, with no index entry to write.
    let done = a.store.open(p("f")).unwrap();
    let puts = client.count(Op::Put);
    commit(
        &done,
        Some(SetAttr {
            atime: Some(TimeSpec::Now),
            mtime: Some(TimeSpec::Now),
            ..Default::default()
        }),
    );
    assert_eq!(client.count(Op::Put) - puts, 1, "the object's PUT alone");
    assert!(!client.metadata(&key("f")).unwrap().contains_key("mtime"));
}

/// A reader keeps the version it opened: a small file is fetched whole at its open, so a new
/// version committed by another host before its first read does not take it away (S3 keeps
/// no replaced versions; the read failed with `EIO`).
#[test]
fn a_reader_reads_the_version_it_opened_when_another_host_replaces_it_before_its_first_read() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    write(a.store.as_ref(), "status", b"version one\n").unwrap();
    let gets = client.count(Op::Get);
    let reader = b.store.open_to_read(p("status")).unwrap();
    assert_eq!(client.count(Op::Get), gets + 1, "fetched whole at the open");
    write(a.store.as_ref(), "status", b"version two, longer\n").unwrap();
    let gets = client.count(Op::Get);
    assert_eq!(read(reader.as_ref()), b"version one\n");
    assert_eq!(client.count(Op::Get), gets, "read from the cache entry");
    // Fetched, not written here: not for the kernel to read itself (passthrough), which would
    // not read on into another host's appends.
    assert!(reader.local().is_none());
    assert!(a.store.open_to_read(p("status")).unwrap().local().is_some());
    // A plain open (a writer's base) still fetches nothing until it is read.
    let gets = client.count(Op::Get);
    let base = b.store.open(p("status")).unwrap();
    assert_eq!(client.count(Op::Get), gets);
    drop(base);
}

/// A reader's open of a version another host has replaced since this host learnt of it (its
/// attributes still fresh here) is `ESTALE`, having learnt the current version: the kernel
/// looks the name up again, gets the new attributes, and its next open reads the new version.
#[test]
fn a_readers_open_of_a_version_gone_is_estale_and_the_next_reads_the_new_version() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    write(a.store.as_ref(), "status", b"version one\n").unwrap();
    assert_eq!(b.store.stat(p("status")).unwrap().size, 12);
    write(a.store.as_ref(), "status", b"version two, longer\n").unwrap();
    assert_eq!(b.store.stat(p("status")).unwrap().size, 12, "B's TTL: 60 s");
    let e = b.store.open_to_read(p("status")).err().expect("ESTALE");
    assert_eq!(e.raw_os_error(), libc::ESTALE);
    assert_eq!(b.store.stat(p("status")).unwrap().size, 20, "learnt");
    let reader = b.store.open_to_read(p("status")).unwrap();
    assert_eq!(read(reader.as_ref()), b"version two, longer\n");
    // Removed meanwhile: the name is gone.
    write(a.store.as_ref(), "status", b"version three\n").unwrap();
    b.store.forget(p("status"), false);
    assert_eq!(b.store.stat(p("status")).unwrap().size, 14);
    a.store.unlink(p("status")).unwrap();
    assert_eq!(
        b.store
            .open_to_read(p("status"))
            .err()
            .unwrap()
            .raw_os_error(),
        libc::ENOENT
    );
}

/// A reader's open of a version another host has appended to since this host learnt of it
/// reads the newer version, which begins with the bytes the kernel knows of: no `ESTALE`,
/// which a log appended to faster than the kernel's one retry of the open took would
/// have given to the reader (`tail -f`, `cat` of another host's log).
#[test]
fn a_readers_open_of_a_version_appended_to_opens_the_newer_one() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (host(&client), host(&client));
    write(a.store.as_ref(), "log", b"start\n").unwrap();
    assert_eq!(b.store.stat(p("log")).unwrap().size, 6);
    let base = a.store.open(p("log")).unwrap();
    let v1 = commit_append(a.store.as_ref(), "log", &base, b"one\n", true).unwrap();
    commit_append(a.store.as_ref(), "log", &v1, b"two\n", true).unwrap();
    assert_eq!(b.store.stat(p("log")).unwrap().size, 6, "B's TTL: 60 s");
    let reader = b.store.open_to_read(p("log")).unwrap();
    assert_eq!(reader.meta().size, 14);
    assert_eq!(read(reader.as_ref()), b"start\none\ntwo\n");
    // A rewrite is another file: the kernel must learn its size first.
    write(a.store.as_ref(), "log", b"rewritten\n").unwrap();
    let e = b.store.open_to_read(p("log")).err().expect("ESTALE");
    assert_eq!(e.raw_os_error(), libc::ESTALE);
}

/// A rename whose source another host keeps rewriting (each copy's `If-Match` fails) tries
/// again a few times before `EIO`; one whose source another host moved away is `ENOENT`
/// (nothing half done, nothing left for a restart to finish).
#[test]
fn a_rename_outlasts_a_source_rewritten_meanwhile_and_a_source_gone_is_enoent() {
    let client = Arc::new(MemClient::new());
    let a = host(&client);
    let s = a.store.as_ref();
    write(s, "x.tmp", b"saved").unwrap();
    client.fail(Op::Copy, Some("/x"), Failure::Precondition, 3);
    s.rename(p("x.tmp"), p("x"), RenameMode::Replace).unwrap();
    assert_eq!(client.object(&key("x")).unwrap(), b"saved");
    assert!(client.object(&key("x.tmp")).is_none());
    // Rewritten under every copy: given up, the source where it was.
    write(s, "y.tmp", b"y").unwrap();
    let refused = |from: &str, to: &str| {
        s.rename(p(from), p(to), RenameMode::Replace)
            .unwrap_err()
            .raw_os_error()
    };
    client.fail(Op::Copy, Some("/y"), Failure::Precondition, 100);
    assert_eq!(refused("y.tmp", "y"), libc::EIO);
    client.heal();
    assert!(client.object(&key("y.tmp")).is_some());
    // Moved away by another host after this one looked: ENOENT, and no journal record.
    write(s, "z.tmp", b"z").unwrap();
    client.fail(Op::Copy, Some("/z"), Failure::NotFound, 1);
    assert_eq!(refused("z.tmp", "z"), libc::ENOENT);
    assert_eq!(journaled(&a), 0);
}
