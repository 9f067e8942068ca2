//! `roomfs serve`: one process serving many mounts, agent records and sessions, controlled
//! through the HTTP/JSON API on a Unix socket ([`crate::control`]).

pub mod config;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use signal_hook::consts::{SIGINT, SIGTERM};

pub use config::Config;

use crate::control::{
    ApiError, ControlPlane, EndReport, EndSessionRequest, MountInfo, MountRequest, SessionInfo,
    SessionRequest, Status, UnmountRequest,
};
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

/// A mount the daemon serves.
struct Served {
    mount: Arc<ActiveMount>,
    from_config: bool,
}

/// The daemon's state.
pub struct Daemon {
    config: Config,
    data_dir: PathBuf,
    socket: PathBuf,
    /// The spaces open in this process (one object per space, shared by its mounts).
    hub: Arc<Hub>,
    records: Arc<RecordStore>,
    poller: Option<Arc<crate::poll::Poller>>,
    mounts: Mutex<Vec<Served>>,
    /// Unix ms of the last record write per session (inactivity timeouts).
    record_activity: Mutex<HashMap<String, u64>>,
    started: Instant,
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

/// Normalises a path given inside a space (`outputs/`, `./a/b`): no `..`, not absolute.
fn space_relative(path: &str) -> Result<PathBuf, ApiError> {
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
            "{path:?} names no path inside the session"
        )));
    }
    Ok(out)
}

impl Daemon {
    /// Prepares the data dir and records, and mounts what the configuration lists.
    pub fn start(config: Config) -> Result<Arc<Daemon>, String> {
        config.check()?;
        let data_dir = config
            .data_dir
            .clone()
            .unwrap_or_else(space::default_data_dir);
        let socket = config
            .socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::control::DEFAULT_SOCKET));
        let local = mount::open_data_dir(&data_dir)?;
        let records_dir = config
            .records_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("records"));
        let records = Arc::new(RecordStore::open(&records_dir).map_err(|e| {
            format!(
                "cannot open the record store {}: {e}",
                records_dir.display()
            )
        })?);
        let poller = crate::poll::Poller::start(Duration::from_micros(config.poll_window_us));
        let rooms = config.store.open(&data_dir)?;
        let sessions = if config.session_store == config.store {
            rooms.clone()
        } else {
            config.session_store.open(&data_dir)?
        };
        let hub = Arc::new(Hub::with_stores(
            local,
            Some(records.clone()),
            rooms,
            sessions,
        ));
        let daemon = Arc::new_cyclic(|me| Daemon {
            config,
            data_dir,
            socket,
            hub,
            records,
            poller,
            mounts: Mutex::new(Vec::new()),
            record_activity: Mutex::new(HashMap::new()),
            started: Instant::now(),
            me: me.clone(),
        });
        // A configured mount that cannot be set up (a session since ended, a path in use) is
        // logged; the daemon still serves everything else.
        for m in daemon.config.mounts.clone() {
            if let Err(e) = std::fs::create_dir_all(&m.mountpoint)
                && !m.mountpoint.exists()
            {
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
                read_only: None,
                store: None,
            };
            if let Err(e) = daemon.mount(req, true) {
                log::error!(
                    "configured mount at {} failed: {}",
                    m.mountpoint.display(),
                    e.message
                );
            }
        }
        daemon.spawn_reaper();
        Ok(daemon)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The space and grant a mount request names, from a verified token or from its fields.
    fn resolve(&self, req: &MountRequest) -> Result<(SpaceId, Grant), ApiError> {
        if let Some(tok) = &req.token {
            let secret_file = self.config.secret_file.as_ref().ok_or_else(|| {
                ApiError::bad_request(
                    "this daemon has no secret_file configured: it cannot verify tokens",
                )
            })?;
            let secret = token::read_secret_file(secret_file).map_err(ApiError::internal)?;
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
            let space = SpaceId::new(SpaceKind::Room, &room).map_err(ApiError::bad_request)?;
            return Ok((space, verified.grant));
        }
        let space = match (&req.room, &req.session) {
            (Some(id), None) => SpaceId::new(SpaceKind::Room, id),
            (None, Some(id)) => SpaceId::new(SpaceKind::Session, id),
            _ => Err("give exactly one of \"room\" or \"session\"".to_string()),
        }
        .map_err(ApiError::bad_request)?;
        let grant = Grant::parse_cli(&req.grant)
            .map_err(|e| ApiError::bad_request(format!("grant: {e}")))?;
        Ok((space, grant))
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

    fn session_state(&self, id: &str) -> Result<SessionState, ApiError> {
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

    fn mount(&self, req: MountRequest, from_config: bool) -> Result<MountInfo, ApiError> {
        let (space, grant) = self.resolve(&req)?;
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
        let spec = MountSpec {
            data_dir: self.data_dir.clone(),
            space: space.clone(),
            mountpoint,
            sync_on_close: req.sync_on_close.unwrap_or(self.config.sync_on_close),
            passthrough: req.passthrough.unwrap_or(self.config.passthrough),
            cache_ttl: Duration::from_secs_f64(self.config.cache_ttl_secs),
            threads: self.config.threads,
            poll_window: Duration::ZERO,
            grant,
            records_dir: PathBuf::new(),
            limits: None,
            read_only: req.read_only.unwrap_or(false),
            store: self.store_of(space.kind).clone(),
        };
        let resources = Resources {
            hub: self.hub.clone(),
            limits: self.limits(&space)?,
            poller: self.poller.clone(),
        };
        let me = self.me.clone();
        let mut mounts = lock(&self.mounts);
        let ended_at = spec.mountpoint.clone();
        let mount = ActiveMount::start(&spec, resources, move || {
            if let Some(daemon) = me.upgrade() {
                daemon.forget_mount(&ended_at);
            }
        })
        .map_err(|e| {
            if e.contains("already in use") {
                ApiError::conflict(e)
            } else if e.contains("does not exist") || e.contains("not a directory") {
                ApiError::bad_request(e)
            } else {
                ApiError::internal(e)
            }
        })?;
        let info = info_of(&mount, from_config);
        mounts.push(Served {
            mount: Arc::new(mount),
            from_config,
        });
        Ok(info)
    }

    /// Drops a mount that ended (unmounted by the API, `roomfs unmount` or `umount`).
    fn forget_mount(&self, mountpoint: &Path) {
        let mut mounts = lock(&self.mounts);
        mounts.retain(|s| !(s.mount.has_ended() && same_mountpoint(&s.mount, mountpoint)));
    }

    /// Takes the mounts serving `space` out of the table and unmounts them (lazily).
    fn unmount_space(&self, space: &SpaceId) -> Vec<String> {
        let taken: Vec<Served> = {
            let mut mounts = lock(&self.mounts);
            let (taken, kept) = mounts.drain(..).partition(|s| s.mount.space == *space);
            *mounts = kept;
            taken
        };
        taken
            .into_iter()
            .map(|s| {
                if let Err(e) = s.mount.unmount(true) {
                    log::error!("{e}");
                }
                s.mount.mountpoint.to_string_lossy().into_owned()
            })
            .collect()
    }

    /// Unix ms of the session's last activity: its recorded state, its mounts, its records.
    fn last_active(&self, state: &SessionState, space: &SpaceId) -> u64 {
        let fs_activity = lock(&self.mounts)
            .iter()
            .filter(|s| s.mount.space == *space)
            .map(|s| s.mount.fs.last_activity() * 1000)
            .max()
            .unwrap_or(0);
        let records = lock(&self.record_activity)
            .get(&state.id)
            .copied()
            .unwrap_or(0);
        state.last_active.max(fs_activity).max(records)
    }

    fn session_info(&self, state: SessionState) -> SessionInfo {
        let space = SpaceId {
            kind: SpaceKind::Session,
            id: state.id.clone(),
        };
        let usage = self.hub.usage(&space).ok().flatten().unwrap_or_default();
        let last_active = self.last_active(&state, &space);
        let mounts = lock(&self.mounts)
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
            files: usage.files,
            bytes: usage.bytes,
            mounts,
        }
    }

    /// Ends sessions idle for longer than their TTL, every second.
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
                    if now_ms().saturating_sub(daemon.last_active(&state, &space)) > ttl * 1000 {
                        log::info!("session {} idle for over {ttl}s: ending it", state.id);
                        if let Err(e) = daemon.end_session(&state.id, EndSessionRequest::default())
                        {
                            log::error!("ending idle session {}: {}", state.id, e.message);
                        }
                    }
                }
            }
        });
    }

    /// Unmounts everything (committing open files), for a clean exit.
    pub fn shutdown(&self) {
        let all: Vec<Served> = lock(&self.mounts).drain(..).collect();
        for s in &all {
            if let Err(e) = s.mount.unmount(true) {
                log::error!("{e}");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while all.iter().any(|s| !s.mount.has_ended()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
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

fn same_mountpoint(mount: &ActiveMount, path: &Path) -> bool {
    mount.mountpoint == path || path.canonicalize().is_ok_and(|p| p == mount.mountpoint)
}

fn info_of(mount: &ActiveMount, from_config: bool) -> MountInfo {
    MountInfo {
        mountpoint: mount.mountpoint.to_string_lossy().into_owned(),
        kind: mount.space.kind.noun().into(),
        id: mount.space.id.clone(),
        grant: mount.grant.to_string(),
        from_config,
    }
}

impl ControlPlane for Daemon {
    fn status(&self) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            data_dir: self.data_dir.to_string_lossy().into_owned(),
            socket: self.socket.to_string_lossy().into_owned(),
            mounts: lock(&self.mounts).len(),
            sessions: state::list(self.data()).map_or(0, |s| s.len()),
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }

    fn mounts(&self) -> Vec<MountInfo> {
        lock(&self.mounts)
            .iter()
            .filter(|s| !s.mount.has_ended())
            .map(|s| info_of(&s.mount, s.from_config))
            .collect()
    }

    fn add_mount(&self, req: MountRequest) -> Result<MountInfo, ApiError> {
        self.mount(req, false)
    }

    fn remove_mount(&self, req: UnmountRequest) -> Result<(), ApiError> {
        let path = PathBuf::from(&req.mountpoint);
        let served = {
            let mut mounts = lock(&self.mounts);
            let i = mounts
                .iter()
                .position(|s| same_mountpoint(&s.mount, &path))
                .ok_or_else(|| {
                    ApiError::not_found(format!("no mount of this daemon at {}", path.display()))
                })?;
            mounts.remove(i)
        };
        match served.mount.unmount(req.lazy) {
            Ok(()) => Ok(()),
            Err(e) => {
                lock(&self.mounts).push(served);
                Err(ApiError::conflict(e))
            }
        }
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
        let space = SpaceId::new(SpaceKind::Session, &req.id).map_err(ApiError::bad_request)?;
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
        let state = SessionState {
            id: req.id.clone(),
            limits: req.limits.unwrap_or(self.config.session_limits),
            ttl_secs: req.ttl_secs.or(self.config.session_ttl_secs),
            created_at: now,
            last_active: now,
        };
        self.hub
            .make(&space)
            .map_err(|e| internal("creating the session's space", e))?;
        state::save(self.data(), &state).map_err(|e| internal("saving session state", e))?;
        log::info!("created session {}", req.id);
        Ok(self.session_info(state))
    }

    fn end_session(&self, id: &str, req: EndSessionRequest) -> Result<EndReport, ApiError> {
        self.session_state(id)?;
        let space = SpaceId::new(SpaceKind::Session, id).map_err(ApiError::bad_request)?;
        // Check the export request before changing anything.
        let export_to = if req.export.is_empty() {
            None
        } else {
            let room = req.to_room.as_deref().ok_or_else(|| {
                ApiError::bad_request("export needs to_room: the room to copy the paths into")
            })?;
            let room = SpaceId::new(SpaceKind::Room, room).map_err(ApiError::bad_request)?;
            let paths = req
                .export
                .iter()
                .map(|p| space_relative(p))
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
            let done = export(&session, &target, &paths, |_| {}).map_err(export_error(id))?;
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
        let deleted_records =
            self.records
                .delete_session(id)
                .map_err(|e| internal("deleting the session's records", e))? as u64;
        state::delete(self.data(), id).map_err(|e| internal("deleting session state", e))?;
        lock(&self.record_activity).remove(id);
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

    fn metrics(&self) -> metrics::Snapshot {
        let mut snapshot = metrics::Snapshot::default();
        let mut mounted: Vec<SpaceId> = Vec::new();
        for served in lock(&self.mounts).iter().filter(|s| !s.mount.has_ended()) {
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
                lock(&self.record_activity).insert(id.to_string(), now_ms());
            }
        }
        Ok(result)
    }
}

/// Runs the daemon in the foreground until SIGTERM/SIGINT: start, serve the control API,
/// tell systemd it is ready, then unmount everything and exit.
pub fn serve(config: Config) -> Result<(), String> {
    // Signals are caught first, so one arriving during start-up still shuts down cleanly.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let daemon = Daemon::start(config)?;
    let listener = match crate::control::server::bind(daemon.socket()) {
        Ok(l) => l,
        Err(e) => {
            daemon.shutdown();
            return Err(e.to_string());
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the API runtime: {e}"))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signal_handle = signals.handle();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            log::info!("signal {sig}: unmounting everything and stopping");
            let _ = stop_tx.send(());
        }
    });
    log::info!("serving the control API on {}", daemon.socket().display());
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        log::debug!("sd_notify: {e}");
    }
    let plane: Arc<dyn ControlPlane> = daemon.clone();
    let served = runtime.block_on(crate::control::server::serve(listener, plane, async {
        let _ = stop_rx.await;
    }));
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    signal_handle.close();
    daemon.shutdown();
    let _ = std::fs::remove_file(daemon.socket());
    runtime.shutdown_timeout(Duration::from_secs(2));
    served.map_err(|e| format!("control API failed: {e}"))?;
    log::info!("stopped");
    Ok(())
}
