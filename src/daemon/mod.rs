//! `roomfs serve`: one process serving many mounts, agent records and sessions, controlled
//! through the HTTP/JSON API on a Unix socket ([`crate::control`]).

pub mod config;
mod persisted;

use anyhow::Context;
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use signal_hook::consts::{SIGINT, SIGTERM};

pub use config::Config;

use crate::control::{
    ApiError, ControlPlane, EndReport, EndSessionRequest, EventSource, MountInfo, MountRequest,
    SessionInfo, SessionRequest, SignedUrl, Status, UnmountRequest, UrlRequest,
};
use crate::error::Invalid;
use crate::fs::Limits;
use crate::grant::Grant;
use crate::metrics;
use crate::mount::{self, ActiveMount, MountSpec, Resources};
use crate::records::RecordStore;
use crate::space::export::{ExportError, export};
use crate::space::{self, Hub, SessionState, SpaceId, SpaceKind, state};
use crate::store::StoreConfig;
use crate::store::local::at::Dir;
use crate::token;

/// Where a mount comes from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Origin {
    /// Listed in the configuration: set up at every start, never persisted.
    Config,
    /// Added through the API now: persisted.
    Api,
    /// Persisted by an earlier run, set up again at start.
    Restored,
}

/// A mount the daemon serves.
struct Served {
    /// Tells this mount apart from earlier and later ones at the same mount point.
    id: u64,
    mount: Arc<ActiveMount>,
    /// The request that made it, persisted; `None` for a configured mount.
    request: Option<MountRequest>,
}

/// A mount being set up.
struct Pending {
    id: u64,
    /// As requested (not resolved: resolving it may be what hangs).
    mountpoint: PathBuf,
    space: SpaceId,
}

/// The daemon's mounts. Its lock is never held while a mount is set up or unmounted, nor
/// across any other wait: a mount point that hangs stalls its own request only.
#[derive(Default)]
struct Table {
    served: Vec<Served>,
    /// Mount points being set up: another request for one of them is refused (409) meanwhile.
    pending: Vec<Pending>,
    /// Sessions being ended: they cannot be mounted meanwhile, and a session cannot be ended
    /// while a mount of it is being set up.
    ending: Vec<SpaceId>,
    /// The daemon is stopping: nothing is added, and the persisted mounts are kept as they
    /// are, so that they come back at the next start.
    closing: bool,
}

/// The daemon's state.
pub struct Daemon {
    config: Config,
    /// This daemon's hold on the data dir (see `persisted::hold`).
    _held: std::fs::File,
    data_dir: PathBuf,
    socket: PathBuf,
    /// The spaces open in this process (one object per space, shared by its mounts).
    hub: Arc<Hub>,
    records: Arc<RecordStore>,
    poller: Option<Arc<crate::poll::Poller>>,
    mounts: Mutex<Table>,
    next_mount: AtomicU64,
    /// Taken to write `state/mounts.json`, so that the last writer writes the latest table.
    persisting: Mutex<()>,
    /// Taken to write or remove a session's state, so that saving activity never brings back
    /// the state of a session just ended.
    state_writes: Mutex<()>,
    /// Unix ms of the latest activity per session seen in this process and not yet in its
    /// saved state: record writes, and the last activity of its mounts that went away.
    activity: Mutex<HashMap<String, u64>>,
    started: Instant,
    /// Unix ms of the start.
    started_ms: u64,
    /// Ends the streams of `GET /v1/events` followers (a session ended, the daemon stopping).
    ends: crate::events::stream::Ends,
    me: Weak<Daemon>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
    log::error!("{what}: {e}");
    ApiError::internal(format!("{what}: {e}"))
}

/// Normalises a path given inside `space` (`outputs/`, `./a/b`): no `..`, not absolute.
fn space_relative(path: &str, space: &SpaceId) -> Result<PathBuf, ApiError> {
    let mut out = PathBuf::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(ApiError::bad_request(format!(
                    "{path:?}: \"..\" is not allowed"
                )));
            }
            p => out.push(p),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(ApiError::bad_request(format!(
            "{path:?} names no path inside {space}"
        )));
    }
    Ok(out)
}

impl Daemon {
    /// Prepares the data dir and records, and mounts what the configuration lists.
    pub fn start(config: Config) -> anyhow::Result<Arc<Daemon>> {
        config.check()?;
        let data_dir = config
            .data_dir
            .clone()
            .unwrap_or_else(space::default_data_dir);
        let socket = config
            .socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::control::DEFAULT_SOCKET));
        // Before anything is mounted or saved: a daemon already serving keeps its mounts and
        // its saved state (a second start that went on would rewrite them as it failed).
        crate::control::server::check_not_served(&socket)?;
        // Read at each use (it may be rotated), but one that cannot be read now is a mistake
        // to hear of at start, not at the first token.
        if let Some(secret_file) = &config.secret_file {
            token::read_secret_file(secret_file)?;
        }
        let records_dir = config.records_dir(&data_dir)?;
        let local = mount::open_data_dir(&data_dir)?;
        let held = persisted::hold(local.data_dir(), &socket)
            .with_context(|| format!("cannot serve the data dir {}", data_dir.display()))?;
        let records =
            Arc::new(RecordStore::open(&records_dir).with_context(|| {
                format!("cannot open the record store {}", records_dir.display())
            })?);
        let poller = crate::poll::Poller::start(Duration::from_micros(config.poll_window_us));
        let rooms = config.store.open(&data_dir).map_err(anyhow::Error::msg)?;
        let sessions = if config.session_store == config.store {
            rooms.clone()
        } else {
            config
                .session_store
                .open(&data_dir)
                .map_err(anyhow::Error::msg)?
        };
        let hub = Arc::new(Hub::with_stores(
            local,
            Some(records.clone()),
            config.event_retention,
            rooms,
            sessions,
        ));
        let daemon = Arc::new_cyclic(|me| Daemon {
            config,
            _held: held,
            data_dir,
            socket,
            hub,
            records,
            poller,
            mounts: Mutex::new(Table::default()),
            next_mount: AtomicU64::new(1),
            persisting: Mutex::new(()),
            state_writes: Mutex::new(()),
            activity: Mutex::new(HashMap::new()),
            started: Instant::now(),
            started_ms: now_ms(),
            ends: Default::default(),
            me: me.clone(),
        });
        // A configured mount that cannot be set up (a session since ended, a path in use) is
        // logged; the daemon still serves everything else.
        for m in daemon.config.mounts.clone() {
            // Made as `mkdir -p` would, but through root's own symlinks only and beneath what
            // exists without following any (an agent's symlink in its home must not have root
            // make directories, or mount, elsewhere). A dead mount left there by a crash counts
            // as there: setting the mount up clears it.
            if let Err(e) = mount::path::create_dirs(&m.mountpoint) {
                log::error!("cannot create mount point {}: {e}", m.mountpoint.display());
                continue;
            }
            let req = MountRequest {
                mountpoint: m.mountpoint.to_string_lossy().into_owned(),
                room: m.room,
                session: m.session,
                grant: m.grant,
                token: m.token,
                sync_on_close: None,
                passthrough: None,
                label: m.label,
                read_only: None,
                noexec: None,
                store: None,
            };
            if let Err(e) = daemon.mount(req, Origin::Config) {
                log::error!(
                    "configured mount at {} failed: {}",
                    m.mountpoint.display(),
                    e.message
                );
            }
        }
        daemon.restore_mounts();
        daemon.spawn_reaper();
        Ok(daemon)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The secret tokens and URLs are signed with (400 without `secret_file`).
    fn secret(&self, for_what: &str) -> Result<Vec<u8>, ApiError> {
        let secret_file = self.config.secret_file.as_ref().ok_or_else(|| {
            ApiError::bad_request(format!(
                "this daemon has no secret_file configured: it cannot {for_what}"
            ))
        })?;
        token::read_secret_file(secret_file).map_err(|e| ApiError::internal(format!("{e:#}")))
    }

    /// The grant a token gives in `space` (401 if it is refused, or for another space).
    fn token_grant(&self, tok: &str, space: &SpaceId) -> Result<Grant, ApiError> {
        self.token_for(tok, space).map(|t| t.grant)
    }

    /// The verified token `tok`, if it is for `space` (401 if it is refused, or for another
    /// space).
    fn token_for(&self, tok: &str, space: &SpaceId) -> Result<token::VerifiedToken, ApiError> {
        let secret = self.secret("verify tokens")?;
        let verified = token::verify(tok, &secret)
            .map_err(|e| ApiError::new(401, format!("token refused: {e}")))?;
        match (&verified.room, space.kind) {
            (Some(room), SpaceKind::Room) if *room == space.id => Ok(verified),
            (Some(room), _) => Err(ApiError::new(
                401,
                format!(
                    "token refused: it is for room {room:?}, not {}",
                    space.name()
                ),
            )),
            (None, _) => Err(ApiError::new(401, "token refused: it names no room")),
        }
    }

    /// The listener for download URLs (`http_listen`), bound; `None` when not configured.
    pub fn http_listener(&self) -> anyhow::Result<Option<std::net::TcpListener>> {
        let Some(addr) = &self.config.http_listen else {
            return Ok(None);
        };
        std::net::TcpListener::bind(addr)
            .map(Some)
            .with_context(|| format!("cannot listen for downloads on {addr}"))
    }

    /// What the download listener serves with.
    pub fn downloads(&self) -> anyhow::Result<crate::urls::http::Downloads> {
        let secret = self.secret("sign URLs")?;
        Ok(crate::urls::http::Downloads {
            secret,
            hub: self.hub.clone(),
        })
    }

    /// The space and grant a mount request names, from a verified token (with the token's
    /// name) or from its fields.
    fn resolve(&self, req: &MountRequest) -> Result<(SpaceId, Grant, Option<String>), ApiError> {
        if let Some(tok) = &req.token {
            if req.grant.is_some() {
                // (Else one would expect the grant to narrow the token's.)
                return Err(ApiError::bad_request(
                    "a token carries the grant: drop \"grant\"",
                ));
            }
            let secret = self.secret("verify tokens")?;
            let verified = token::verify(tok, &secret)
                .map_err(|e| ApiError::new(401, format!("token refused: {e}")))?;
            let room = verified
                .room
                .ok_or_else(|| ApiError::new(401, "token refused: it names no room"))?;
            if req.session.is_some() {
                return Err(ApiError::bad_request(
                    "a token grants a room: drop \"session\"",
                ));
            }

            if let Some(wanted) = &req.room
                && *wanted != room
            {
                return Err(ApiError::new(
                    401,
                    format!("token refused: it is for room {room:?}, not {wanted:?}"),
                ));
            }
            let space = SpaceId::new(SpaceKind::Room, &room)?;
            return Ok((space, verified.grant, verified.name));
        }
        let space = match (&req.room, &req.session) {
            (Some(id), None) => SpaceId::new(SpaceKind::Room, id),
            (None, Some(id)) => SpaceId::new(SpaceKind::Session, id),
            _ => Err(Invalid(
                "give exactly one of \"room\" or \"session\"".into(),
            )),
        }?;
        let grant = Grant::parse_field(req.grant.as_deref())
            .map_err(|e| ApiError::bad_request(format!("grant: {e}")))?;
        Ok((space, grant, None))
    }

    /// The limits of `space`: the configured room limits, or the session's recorded ones.
    fn limits(&self, space: &SpaceId) -> Result<Limits, ApiError> {
        Ok(match space.kind {
            SpaceKind::Room => self.config.room_limits,
            SpaceKind::Session => self.session_state(&space.id)?.limits,
        })
    }

    /// The data dir, held open (session states live beneath it).
    fn data(&self) -> &Dir {
        self.hub.local().data_dir()
    }

    /// The state of session `id`; an id no session can have is refused first (400), before
    /// it becomes a file name (where `/`, NUL or 5,000 characters made the read fail, a 500).
    fn session_state(&self, id: &str) -> Result<SessionState, ApiError> {
        SpaceId::new(SpaceKind::Session, id)?;
        state::load(self.data(), id)
            .map_err(|e| internal("reading session state", e))?
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "no session {id:?} (create it with `roomfs session create {id}`)"
                ))
            })
    }

    /// Where spaces of `kind` are stored.
    fn store_of(&self, kind: SpaceKind) -> &StoreConfig {
        match kind {
            SpaceKind::Room => &self.config.store,
            SpaceKind::Session => &self.config.session_store,
        }
    }

    fn mount(&self, mut req: MountRequest, origin: Origin) -> Result<MountInfo, ApiError> {
        let (space, grant, token_name) = self.resolve(&req)?;
        if let Some(label) = &req.label {
            crate::events::check_label(label)?;
        }
        if let Some(wanted) = &req.store {
            let wanted = StoreConfig::parse(wanted).map_err(ApiError::bad_request)?;
            let have = self.store_of(space.kind);
            if wanted.name() != have.name() {
                let field = match space.kind {
                    SpaceKind::Room => "store",
                    SpaceKind::Session => "session_store",
                };
                return Err(ApiError::bad_request(format!(
                    "this daemon keeps {}s in {}, not {}: set \"{field}\" in its configuration",
                    space.kind.noun(),
                    have.name(),
                    wanted.name()
                )));
            }
        }
        let mountpoint = PathBuf::from(&req.mountpoint);
        if !mountpoint.is_absolute() {
            return Err(ApiError::bad_request("mountpoint must be an absolute path"));
        }
        // `/srv/a/` and `/srv/./a` are `/srv/a` (resolved, a path could hang: see `Table`).
        let mountpoint: PathBuf = mountpoint.components().collect();
        if matches!(origin, Origin::Restored) {
            // It was saved resolved: one that now resolves elsewhere has a symlink in the way,
            // perhaps planted by whoever owns a directory on it (an agent's home), to have
            // the daemon mount over another directory.
            match std::fs::canonicalize(&mountpoint) {
                Ok(now) if now != mountpoint => {
                    return Err(ApiError::bad_request(format!(
                        "mount point {} now leads to {} (a symlink in the way)",
                        mountpoint.display(),
                        now.display()
                    )));
                }
                _ => {}
            }
        }
        let spec = MountSpec {
            data_dir: self.data_dir.clone(),
            space: space.clone(),
            mountpoint: mountpoint.clone(),
            sync_on_close: req.sync_on_close.unwrap_or(self.config.sync_on_close),
            passthrough: req.passthrough.unwrap_or(self.config.passthrough),
            cache_ttl: Duration::from_secs_f64(self.config.cache_ttl_secs),
            threads: self
                .config
                .threads
                .unwrap_or_else(|| self.store_of(space.kind).default_threads()),
            poll_window: Duration::ZERO,
            grant,
            records_dir: PathBuf::new(),
            limits: None,
            participant: token_name.or(req.label.clone()),
            read_only: req.read_only.unwrap_or(false),
            no_exec: req.noexec.unwrap_or(false),
            store: self.store_of(space.kind).clone(),
        };
        let resources = Resources {
            hub: self.hub.clone(),
            limits: self.limits(&space)?,
            poller: self.poller.clone(),
        };
        let id = self.next_mount.fetch_add(1, Ordering::Relaxed);
        self.reserve(Pending {
            id,
            mountpoint,
            space,
        })?;
        let me = self.me.clone();
        let started = ActiveMount::start(&spec, resources, move || {
            if let Some(daemon) = me.upgrade() {
                daemon.mount_ended(id);
            }
        });
        let mut table = lock(&self.mounts);
        table.pending.retain(|p| p.id != id);
        let mount = started.map_err(|e| {
            let message = format!("{e:#}");
            match e.downcast_ref::<mount::BadMountPoint>().map(|b| b.kind) {
                Some(mount::BadMountPointKind::InUse) => ApiError::conflict(message),
                Some(_) => ApiError::bad_request(message),
                None => ApiError::internal(message),
            }
        })?;
        // Another spelling of the same mount point (through a symlink), set up meanwhile.
        let clash = table
            .served
            .iter()
            .any(|s| s.mount.mountpoint == mount.mountpoint && !s.mount.has_ended());
        if table.closing || clash {
            drop(table);
            if let Err(e) = mount.unmount(true) {
                log::error!("{e:#}");
            }
            return Err(if clash {
                ApiError::conflict(format!(
                    "mount point {} is already in use (mounted by this daemon meanwhile)",
                    mount.mountpoint.display()
                ))
            } else {
                ApiError::new(503, "the daemon is stopping")
            });
        }
        req.mountpoint = mount.mountpoint.to_string_lossy().into_owned();
        let info = info_of(&mount, origin == Origin::Config);
        table.served.push(Served {
            id,
            mount: Arc::new(mount),
            request: (origin != Origin::Config).then_some(req),
        });
        drop(table);
        if origin == Origin::Api {
            self.save_mounts();
        }
        Ok(info)
    }

    /// Reserves a mount point for a mount being set up (409 if it is in use or being set up,
    /// or its session is being ended).
    fn reserve(&self, pending: Pending) -> Result<(), ApiError> {
        let mut table = lock(&self.mounts);
        let at = pending.mountpoint.display();
        if table.closing {
            return Err(ApiError::new(503, "the daemon is stopping"));
        }
        if table.ending.contains(&pending.space) {
            return Err(ApiError::conflict(format!(
                "{} is being ended",
                pending.space
            )));
        }
        if table
            .pending
            .iter()
            .any(|p| p.mountpoint == pending.mountpoint)
        {
            return Err(ApiError::conflict(format!(
                "mount point {at} is being set up by another request"
            )));
        }
        if let Some(s) = table
            .served
            .iter()
            .find(|s| s.mount.mountpoint == pending.mountpoint && !s.mount.has_ended())
        {
            return Err(ApiError::conflict(format!(
                "mount point {at} is already in use (this daemon serves {} there)",
                s.mount.space
            )));
        }
        table.pending.push(pending);
        Ok(())
    }

    /// Sets up the mounts added through the API before the last stop. One that cannot be set
    /// up again is logged with the reason and forgotten.
    fn restore_mounts(&self) {
        let requests = match persisted::load(self.data()) {
            Ok(requests) => requests,
            Err(e) => {
                log::error!("cannot read the mounts to restore (left as they are): {e}");
                return;
            }
        };
        let mut dropped = 0;
        for req in requests {
            let at = req.mountpoint.clone();
            if let Err(e) = self.mount(req, Origin::Restored) {
                dropped += 1;
                log::warn!(
                    "not restoring the mount at {at} added through the API: {}",
                    e.message
                );
            }
        }
        if dropped > 0 {
            self.save_mounts();
        }
    }

    /// Writes the mounts added through the API to `state/mounts.json` (not while stopping).
    fn save_mounts(&self) {
        let _turn = lock(&self.persisting);
        let requests: Vec<MountRequest> = {
            let table = lock(&self.mounts);
            if table.closing {
                return;
            }
            table
                .served
                .iter()
                .filter_map(|s| s.request.clone())
                .collect()
        };
        if let Err(e) = persisted::save(self.data(), &requests) {
            log::error!("cannot save the mounts added through the API: {e}");
        }
    }

    /// Forgets a mount that ended (unmounted by its user, or by the daemon), keeping its
    /// session's activity; not while stopping, when every mount ends.
    fn mount_ended(&self, id: u64) {
        let served = {
            let mut table = lock(&self.mounts);
            if table.closing {
                return;
            }
            let Some(i) = table.served.iter().position(|s| s.id == id) else {
                return;
            };
            table.served.remove(i)
        };
        self.mount_gone(&served);
    }

    /// What is kept of a mount taken out of the table: its session's activity, and the
    /// persisted list without it.
    fn mount_gone(&self, served: &Served) {
        let space = &served.mount.space;
        if space.kind == SpaceKind::Session {
            let at = served.mount.fs.last_activity() * 1000;
            self.note_activity(&space.id, at);
            self.save_activity(&space.id);
        }
        if served.request.is_some() {
            self.save_mounts();
        }
    }

    /// Notes activity of session `id` at `at` (Unix ms).
    fn note_activity(&self, id: &str, at: u64) {
        let mut activity = lock(&self.activity);
        let latest = activity.entry(id.to_string()).or_insert(0);
        *latest = (*latest).max(at);
    }

    /// Saves the latest activity of session `id` in its state, if newer than the saved one.
    fn save_activity(&self, id: &str) {
        let _turn = lock(&self.state_writes);
        let state = match state::load(self.data(), id) {
            Ok(Some(state)) => state,
            Ok(None) => return,
            Err(e) => {
                log::warn!("cannot read the state of session {id}: {e}");
                return;
            }
        };
        let space = SpaceId {
            kind: SpaceKind::Session,
            id: id.to_string(),
        };
        let last = self.last_active(&state, &space);
        if last <= state.last_active {
            return;
        }
        let saved = SessionState {
            last_active: last,
            ..state
        };
        if let Err(e) = state::save(self.data(), &saved) {
            log::warn!("cannot save the activity of session {id}: {e}");
        }
    }

    /// Takes the mounts serving `space` out of the table and unmounts them (lazily).
    fn unmount_space(&self, space: &SpaceId) -> Vec<String> {
        let taken: Vec<Served> = {
            let mut table = lock(&self.mounts);
            let (taken, kept) = table
                .served
                .drain(..)
                .partition(|s| s.mount.space == *space);
            table.served = kept;
            taken
        };
        let unmounted = taken
            .iter()
            .map(|s| {
                if let Err(e) = s.mount.unmount(true) {
                    log::error!("{e:#}");
                }
                s.mount.mountpoint.to_string_lossy().into_owned()
            })
            .collect();
        if taken.iter().any(|s| s.request.is_some()) {
            self.save_mounts();
        }
        unmounted
    }

    /// Unix ms of the session's last activity: its recorded state, its mounts, its records.
    fn last_active(&self, state: &SessionState, space: &SpaceId) -> u64 {
        let fs_activity = lock(&self.mounts)
            .served
            .iter()
            .filter(|s| s.mount.space == *space)
            .map(|s| s.mount.fs.last_activity() * 1000)
            .max()
            .unwrap_or(0);
        let noted = lock(&self.activity).get(&state.id).copied().unwrap_or(0);
        state.last_active.max(fs_activity).max(noted)
    }

    fn session_info(&self, state: SessionState) -> SessionInfo {
        let space = SpaceId {
            kind: SpaceKind::Session,
            id: state.id.clone(),
        };
        let usage = self.hub.usage(&space).ok().flatten().unwrap_or_default();
        let last_active = self.last_active(&state, &space);
        let ends_at = state.idle_deadline(last_active, self.started_ms);
        let mounts = lock(&self.mounts)
            .served
            .iter()
            .filter(|s| s.mount.space == space)
            .map(|s| s.mount.mountpoint.to_string_lossy().into_owned())
            .collect();
        SessionInfo {
            id: state.id,
            limits: state.limits,
            ttl_secs: state.ttl_secs,
            created_at: state.created_at,
            last_active,
            ends_at,
            files: usage.files,
            bytes: usage.bytes,
            mounts,
        }
    }

    /// Ends session `id` (marked as being ended in the table).
    fn end_marked(
        &self,
        id: &str,
        space: SpaceId,
        req: EndSessionRequest,
    ) -> Result<EndReport, ApiError> {
        // Check the export request before changing anything.
        let export_to = if req.export.is_empty() {
            if req.to_room.is_some() {
                // Ending would delete everything, exporting nothing: surely not what was meant.
                return Err(ApiError::bad_request(
                    "to_room without export: name the paths to copy into the room (export)",
                ));
            }
            None
        } else {
            let room = req.to_room.as_deref().ok_or_else(|| {
                ApiError::bad_request("export needs to_room: the room to copy the paths into")
            })?;
            let room = SpaceId::new(SpaceKind::Room, room)?;
            let paths = req
                .export
                .iter()
                .map(|p| space_relative(p, &space))
                .collect::<Result<Vec<_>, _>>()?;
            Some((room, paths))
        };
        let spaces = match &export_to {
            Some((room, paths)) => {
                let session = self
                    .hub
                    .open(&space, Limits::default(), None)
                    .map_err(|e| internal("opening the session", e))?;
                let target = self
                    .hub
                    .open(room, self.config.room_limits, Some(None))
                    .map_err(|e| internal(&format!("opening {room}"), e))?;
                space::export::check(&session, &target, paths).map_err(export_error(id))?;
                Some((session, target))
            }
            None => None,
        };
        let unmounted = self.unmount_space(&space);
        let mut exported = Vec::new();
        if let (Some((room, paths)), Some((session, target))) = (export_to, spaces) {
            let done = export(&session, &target, &paths, |_| {}).map_err(|e| {
                // Whatever was written stays in the room; the session is not ended.
                let mut e = export_error(id)(e);
                e.message.push_str(&format!(
                    "; session {id:?} was not ended: its files and records are kept{}; end it \
                     again (with the export) once the room can take it",
                    if unmounted.is_empty() {
                        String::new()
                    } else {
                        format!(" (unmounted from {})", unmounted.join(", "))
                    }
                ));
                e
            })?;
            log::info!(
                "exported {} entries ({} bytes) of session {id} into {room}",
                done.entries,
                done.bytes
            );
            exported = paths
                .iter()
                .map(|rel| format!("{}/{}", room.id, rel.display()))
                .collect();
        }
        let deleted = self
            .hub
            .delete(&space)
            .map_err(|e| internal("deleting the session's files", e))?;
        self.ends.deleted(&space.name());
        let deleted_records =
            self.records
                .delete_session(id)
                .map_err(|e| internal("deleting the session's records", e))? as u64;
        {
            let _turn = lock(&self.state_writes);
            state::delete(self.data(), id).map_err(|e| internal("deleting session state", e))?;
        }
        lock(&self.activity).remove(id);
        log::info!(
            "ended session {id}: {} entries and {deleted_records} records deleted",
            deleted.files
        );
        Ok(EndReport {
            id: id.to_string(),
            deleted_files: deleted.files,
            deleted_records,
            exported,
            unmounted,
        })
    }

    /// Every second: ends the sessions idle for their TTL (see
    /// [`SessionState::idle_deadline`]), and saves the activity of the others when it has
    /// moved on by a tenth of their TTL (at least a second, at most a minute).
    fn spawn_reaper(&self) {
        let me = self.me.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let Some(daemon) = me.upgrade() else { return };
                let states = state::list(daemon.data()).unwrap_or_default();
                for state in states {
                    let Some(ttl) = state.ttl_secs else { continue };
                    let space = SpaceId {
                        kind: SpaceKind::Session,
                        id: state.id.clone(),
                    };
                    let activity = daemon.last_active(&state, &space);
                    let due = state
                        .idle_deadline(activity, daemon.started_ms)
                        .is_some_and(|deadline| now_ms() > deadline);
                    if due {
                        log::info!("session {} idle for over {ttl}s: ending it", state.id);
                        if let Err(e) = daemon.end_session(&state.id, EndSessionRequest::default())
                        {
                            log::error!("ending idle session {}: {}", state.id, e.message);
                        }
                    } else if activity
                        > state.last_active + (ttl.saturating_mul(100)).clamp(1000, 60_000)
                    {
                        daemon.save_activity(&state.id);
                    }
                }
            }
        });
    }

    /// Unmounts everything (committing open files), for a clean exit. The mounts added through
    /// the API stay persisted, and the sessions' activity is saved, for the next start.
    pub fn shutdown(&self) {
        let all: Vec<Served> = {
            let mut table = lock(&self.mounts);
            table.closing = true;
            table.served.drain(..).collect()
        };
        for s in &all {
            if s.mount.space.kind == SpaceKind::Session {
                self.note_activity(&s.mount.space.id, s.mount.fs.last_activity() * 1000);
            }
            if let Err(e) = s.mount.unmount(true) {
                log::error!("{e:#}");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let busy =
            || all.iter().any(|s| !s.mount.has_ended()) || !lock(&self.mounts).pending.is_empty();
        while busy() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Files still open: what was written to them since is committed, and writes from now
        // on fail, rather than succeed and go with the process.
        for s in all.iter().filter(|s| !s.mount.has_ended()) {
            let n = s.mount.fs.seal();
            log::warn!(
                "{}: files still open at exit; committed {n} with changes, further writes \
                 to them fail",
                s.mount.mountpoint.display()
            );
        }
        let noted: Vec<String> = lock(&self.activity).keys().cloned().collect();
        for id in noted {
            self.save_activity(&id);
        }
    }
}

/// The API's answer to an export of session `id` that did not go through.
fn export_error(id: &str) -> impl Fn(ExportError) -> ApiError + '_ {
    move |e| match e {
        ExportError::Missing(_) => ApiError::not_found(format!("export from session {id:?}: {e}")),
        ExportError::Refused(_) => ApiError::conflict(format!("export from session {id:?}: {e}")),
        ExportError::Failed { .. } => internal(&format!("export from session {id:?}"), e),
    }
}

fn info_of(mount: &ActiveMount, from_config: bool) -> MountInfo {
    MountInfo {
        mountpoint: mount.mountpoint.to_string_lossy().into_owned(),
        kind: mount.space.kind.noun().into(),
        id: mount.space.id.clone(),
        grant: mount.grant.to_string(),
        read_only: mount.read_only,
        noexec: mount.no_exec,
        from_config,
    }
}

impl ControlPlane for Daemon {
    fn status(&self) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            data_dir: self.data_dir.to_string_lossy().into_owned(),
            socket: self.socket.to_string_lossy().into_owned(),
            mounts: self.mounts().len(),
            sessions: state::list(self.data()).map_or(0, |s| s.len()),
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }

    fn mounts(&self) -> Vec<MountInfo> {
        lock(&self.mounts)
            .served
            .iter()
            .filter(|s| !s.mount.has_ended())
            .map(|s| info_of(&s.mount, s.request.is_none()))
            .collect()
    }

    fn add_mount(&self, req: MountRequest) -> Result<MountInfo, ApiError> {
        self.mount(req, Origin::Api)
    }

    fn remove_mount(&self, req: UnmountRequest) -> Result<(), ApiError> {
        let path = PathBuf::from(&req.mountpoint);
        let find = |at: &Path| {
            lock(&self.mounts)
                .served
                .iter()
                .find(|s| s.mount.mountpoint == at)
                .map(|s| (s.id, s.mount.clone()))
        };
        // The path as given, else resolved (outside the table's lock: resolving may hang),
        // through root's own symlinks only: an agent's link on the way must not name another
        // mount (see `mount::path`).
        let resolved = || match crate::mount::path::existing_as_me(&path) {
            Ok(p) => Ok(find(&p)),
            Err(e @ crate::mount::path::Refused::Untrusted { .. }) => Err(ApiError::bad_request(
                format!("not unmounting {}: {e}", path.display()),
            )),
            Err(crate::mount::path::Refused::Io(_)) => Ok(None),
        };
        let found = match find(&path) {
            Some(found) => Some(found),
            None if path.is_absolute() => resolved()?,
            None => None,
        };
        let (id, mount) = found.ok_or_else(|| {
            ApiError::not_found(format!("no mount of this daemon at {}", path.display()))
        })?;
        mount
            .unmount(req.lazy)
            .map_err(|e| ApiError::conflict(format!("{e:#}")))?;
        let removed = {
            let mut table = lock(&self.mounts);
            let i = table.served.iter().position(|s| s.id == id);
            i.map(|i| table.served.remove(i))
        };
        if let Some(served) = removed {
            self.mount_gone(&served);
        }
        Ok(())
    }

    fn sessions(&self) -> Vec<SessionInfo> {
        state::list(self.data())
            .unwrap_or_default()
            .into_iter()
            .map(|s| self.session_info(s))
            .collect()
    }

    fn session(&self, id: &str) -> Result<SessionInfo, ApiError> {
        Ok(self.session_info(self.session_state(id)?))
    }

    fn create_session(&self, req: SessionRequest) -> Result<SessionInfo, ApiError> {
        let space = SpaceId::new(SpaceKind::Session, &req.id)?;
        if req.ttl_secs == Some(0) {
            return Err(ApiError::bad_request(
                "ttl_secs must be at least 1 (leave it out for the daemon's default)",
            ));
        }
        crate::space::state::check_ttl("ttl_secs", req.ttl_secs).map_err(ApiError::bad_request)?;
        if let Some(owner) = &req.owner {
            owner.check()?;
        }
        let _turn = lock(&self.state_writes);
        if state::load(self.data(), &req.id)
            .map_err(|e| internal("reading session state", e))?
            .is_some()
        {
            return Err(ApiError::conflict(format!(
                "session {:?} already exists",
                req.id
            )));
        }
        let now = now_ms();
        // A limit the request leaves out is the daemon's default, not unlimited.
        let limits = req
            .limits
            .unwrap_or_default()
            .or(self.config.session_limits);
        let state = SessionState {
            id: req.id.clone(),
            limits,
            ttl_secs: req.ttl_secs.or(self.config.session_ttl_secs),
            created_at: now,
            last_active: now,
        };
        self.hub
            .spaces(space.kind)
            .open_space(&space, Some(req.owner.map(|o| (o.uid, o.gid))))
            .map(drop)
            .map_err(|e| internal("creating the session's space", e))?;
        state::save(self.data(), &state).map_err(|e| internal("saving session state", e))?;
        log::info!("created session {}", req.id);
        Ok(self.session_info(state))
    }

    fn end_session(&self, id: &str, req: EndSessionRequest) -> Result<EndReport, ApiError> {
        self.session_state(id)?;
        let space = SpaceId::new(SpaceKind::Session, id)?;
        {
            let mut table = lock(&self.mounts);
            if table.ending.contains(&space) {
                return Err(ApiError::conflict(format!(
                    "session {id:?} is already being ended"
                )));
            }
            if table.pending.iter().any(|p| p.space == space) {
                return Err(ApiError::conflict(format!(
                    "a mount of session {id:?} is being set up: end it once that is done"
                )));
            }
            table.ending.push(space.clone());
        }
        let ended = self.end_marked(id, space.clone(), req);
        lock(&self.mounts).ending.retain(|s| *s != space);
        ended
    }

    fn events(&self, space: &str, token: Option<&str>) -> Result<EventSource, ApiError> {
        let id = SpaceId::parse(space)?;
        let grant = token.map(|t| self.token_grant(t, &id)).transpose()?;
        let feed = self.hub.feed(&id).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                ApiError::not_found(format!("no {id}"))
            } else {
                internal(&format!("opening the events of {id}"), e)
            }
        })?;
        Ok(EventSource {
            feed,
            ended: self.ends.signal(&id.name()),
            space: id.name(),
            grant,
        })
    }

    fn sign_url(&self, req: UrlRequest) -> Result<SignedUrl, ApiError> {
        use crate::urls::{self, Disposition};
        let space = match (&req.room, &req.session) {
            (Some(id), None) => SpaceId::new(SpaceKind::Room, id),
            (None, Some(id)) => SpaceId::new(SpaceKind::Session, id),
            _ => Err(Invalid(
                "give exactly one of \"room\" or \"session\"".into(),
            )),
        }?;
        let path = space_relative(&req.path, &space)?;
        urls::check_path(&path)
            .map_err(|e| ApiError::bad_request(format!("{:?}: {e}", req.path)))?;
        let mut ttl = Duration::from_secs(req.ttl_secs.unwrap_or(urls::DEFAULT_TTL.as_secs()));
        if ttl.is_zero() || ttl > urls::MAX_TTL {
            return Err(ApiError::bad_request(format!(
                "ttl must be between 1 second and {} days",
                urls::MAX_TTL.as_secs() / 86400
            )));
        }
        if let Some(tok) = &req.token {
            let verified = self.token_for(tok, &space)?;
            // A URL checked against a token's grant lives no longer than the token: the
            // default TTL is cut to what it has left; a longer TTL asked for is refused.
            if let Some(exp) = verified.exp {
                let left = Duration::from_secs(
                    exp.saturating_sub(
                        SystemTime::now()
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs()),
                    ),
                );
                if ttl > left {
                    if req.ttl_secs.is_some() || left.is_zero() {
                        return Err(ApiError::new(
                            403,
                            format!(
                                "a URL may not outlive the token it is checked against: the \
                                 token expires in {}s; ask for a ttl of at most that",
                                left.as_secs()
                            ),
                        ));
                    }
                    ttl = left;
                }
            }
            let grant = verified.grant;
            if grant
                .check(path.as_os_str().as_bytes(), crate::grant::Access::Read)
                .is_err()
            {
                return Err(ApiError::new(
                    403,
                    format!("{} is outside the token's grant", path.display()),
                ));
            }
        }
        let store = self.hub.download_store(&space).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                ApiError::not_found(format!("no {space}"))
            } else {
                internal(&format!("opening {space}"), e)
            }
        })?;
        match store.stat(&path) {
            Ok(m) if m.kind == crate::store::Kind::File => {}
            Ok(_) => {
                return Err(ApiError::bad_request(format!(
                    "{} is not a file",
                    path.display()
                )));
            }
            Err(e) if e.raw_os_error() == libc::ENOENT => {
                return Err(ApiError::not_found(format!(
                    "no file at {} in {space}",
                    path.display()
                )));
            }
            Err(e) => return Err(internal(&format!("looking at {}", path.display()), e)),
        }
        let disposition = if req.attachment {
            Disposition::Attachment
        } else {
            Disposition::Inline
        };
        // Whole seconds, rounded up: the URL works for at least the TTL asked for.
        let expires = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
            + ttl.as_secs();
        if req.direct {
            let presigner = self.hub.presigner(&space).ok_or_else(|| {
                ApiError::conflict(format!(
                    "direct URLs come from an object store; {space} is stored on this host's \
                     disk (leave out --direct to get a URL this daemon serves)"
                ))
            })?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let url = presigner
                .presign_get(&path, ttl, disposition, &name)
                .map_err(|e| internal("presigning the URL", e))?;
            return Ok(SignedUrl { url, expires });
        }
        let base = match (&self.config.http_public_url, &self.config.http_listen) {
            (Some(url), _) => url.clone(),
            (None, Some(addr)) => format!("http://{addr}"),
            (None, None) => {
                return Err(ApiError::conflict(
                    "this daemon serves no downloads: set http_listen (or http_public_url, \
                     when another daemon sharing the secret serves them) in its configuration",
                ));
            }
        };
        let secret = self.secret("sign URLs")?;
        // A session's link names the session it was made for (see `urls`).
        let session = match space.kind {
            SpaceKind::Session => state::load(self.data(), &space.id)
                .map_err(|e| internal("reading session state", e))?
                .map(|s| s.created_at),
            SpaceKind::Room => None,
        };
        let grant = urls::Grant {
            space,
            path,
            expires,
            disposition,
            session,
        };
        Ok(SignedUrl {
            url: urls::sign(&secret, &base, &grant),
            expires,
        })
    }

    fn metrics(&self) -> metrics::Snapshot {
        let mut snapshot = metrics::Snapshot::default();
        let mut mounted: Vec<SpaceId> = Vec::new();
        for served in lock(&self.mounts)
            .served
            .iter()
            .filter(|s| !s.mount.has_ended())
        {
            let space = &served.mount.space;
            match space.kind {
                SpaceKind::Room => snapshot.room_mounts += 1,
                SpaceKind::Session => snapshot.session_mounts += 1,
            }
            if !mounted.contains(space) {
                mounted.push(space.clone());
            }
        }
        // Usage is counted for spaces with limits (their quota); only mounted ones are shown,
        // so the `space` label takes as many values as there are mounts.
        snapshot.spaces = mounted
            .iter()
            .filter_map(|space| {
                let quota = self.hub.get(space)?.quota()?.clone();
                Some(metrics::SpaceSample {
                    space: space.rel_dir().to_string_lossy().into_owned(),
                    usage: quota.usage(),
                    limits: quota.limits(),
                })
            })
            .collect();
        snapshot.sessions = self.status().sessions as u64;
        snapshot
    }

    fn storage(&self, envelope: Value) -> Result<Value, ApiError> {
        let result = self.records.handle(&envelope)?;
        // Record writes count as activity of their session.
        let method = envelope.get("method").and_then(Value::as_str).unwrap_or("");
        if !method.ends_with(".get") && !method.ends_with(".listBySession") {
            let session = if method.starts_with("session.") {
                envelope.get("id")
            } else {
                envelope
                    .get("value")
                    .or_else(|| envelope.get("updates"))
                    .and_then(|v| v.get("sessionId"))
            };
            if let Some(id) = session.and_then(Value::as_str) {
                self.note_activity(id, now_ms());
            }
        }
        Ok(result)
    }
}

/// Runs the daemon in the foreground until SIGTERM/SIGINT: start, serve the control API,
/// tell systemd it is ready, then unmount everything and exit.
pub fn serve(config: Config) -> anyhow::Result<()> {
    // Signals are caught first, so one arriving during start-up still shuts down cleanly.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("cannot install signal handlers")?;
    let daemon = Daemon::start(config)?;
    // The control socket last: a start that fails leaves none behind.
    let http = match daemon
        .http_listener()
        .and_then(|h| h.map(|h| Ok((h, daemon.downloads()?))).transpose())
    {
        Ok(h) => h,
        Err(e) => {
            daemon.shutdown();
            return Err(e);
        }
    };
    let listener = match crate::control::server::bind(daemon.socket()) {
        Ok(l) => l,
        Err(e) => {
            daemon.shutdown();
            return Err(e.into());
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the API runtime")?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signal_handle = signals.handle();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            log::info!("signal {sig}: unmounting everything and stopping");
            let _ = stop_tx.send(());
        }
    });
    let plane: Arc<dyn ControlPlane> = daemon.clone();
    // Downloads stop with the control API.
    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
    if let Some((http, downloads)) = http {
        let downloads = Arc::new(downloads);
        let addr = http
            .local_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        runtime.spawn(async move {
            let stopped = async {
                let _ = http_stop_rx.await;
            };
            if let Err(e) = crate::urls::http::serve(http, downloads, stopped).await {
                log::error!("the download listener failed: {e}");
            }
        });
        log::info!("serving download URLs on http://{addr}");
    }
    log::info!("serving the control API on {}", daemon.socket().display());
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        log::debug!("sd_notify: {e}");
    }
    let stopping = daemon.clone();
    let served = runtime.block_on(crate::control::server::serve(listener, plane, async move {
        let _ = stop_rx.await;
        // The server finishes the responses under way: followers' streams must end.
        stopping.ends.stopping();
    }));
    let _ = http_stop_tx.send(());
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    signal_handle.close();
    daemon.shutdown();
    let _ = std::fs::remove_file(daemon.socket());
    runtime.shutdown_timeout(Duration::from_secs(2));
    served.context("control API failed")?;
    log::info!("stopped");
    Ok(())
}
