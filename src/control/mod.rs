//! The control API: HTTP/JSON on a Unix socket, served by the daemon ([`server`]) and used by
//! the CLI ([`client`]). This module holds the wire types and [`ControlPlane`], the daemon-side
//! implementation the server calls into.
//!
//! Routes (all JSON; an error is `{"error": "<message>"}` with a 4xx/5xx status):
//!
//! | method and path                | request              | response                      |
//! |--------------------------------|----------------------|-------------------------------|
//! | `GET /v1/status`               |                      | [`Status`]                    |
//! | `GET /v1/mounts`               |                      | `[`[`MountInfo`]`]`           |
//! | `POST /v1/mounts`              | [`MountRequest`]     | 201 [`MountInfo`]             |
//! | `POST /v1/mounts/remove`       | [`UnmountRequest`]   | `{}`                          |
//! | `GET /v1/sessions`             |                      | `[`[`SessionInfo`]`]`         |
//! | `POST /v1/sessions`            | [`SessionRequest`]   | 201 [`SessionInfo`]           |
//! | `GET /v1/sessions/{id}`        |                      | [`SessionInfo`]               |
//! | `POST /v1/sessions/{id}/end`   | [`EndSessionRequest`] (empty body = `{}`) | [`EndReport`] |
//! | `POST /v1/storage`             | storage envelope     | the envelope's result         |
//! | `GET /v1/events?space=rooms/ID&since=SEQ&follow=BOOL&token=JWT` | | NDJSON, stays open ([`crate::events::stream`]) |
//! | `POST /v1/urls`                | [`UrlRequest`]       | [`SignedUrl`]                 |
//! | `GET /metrics`                 |                      | Prometheus text (not JSON)    |

pub mod client;
pub mod server;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::records::RecordError;

/// Default path of the daemon's control socket.
pub const DEFAULT_SOCKET: &str = "/run/roomfs/control.sock";

/// `path` as the API's text, or why it cannot be: the API is JSON, whose strings are UTF-8,
/// while a path of this host may be any bytes.
pub fn api_path(path: &std::path::Path) -> Result<&str, crate::error::Invalid> {
    path.to_str().ok_or_else(|| {
        crate::error::Invalid(format!(
            "{path:?} is not UTF-8, and the daemon's API takes paths as text"
        ))
    })
}

/// What the daemon does for the control API. The server runs every call on a blocking thread,
/// so implementations may mount, unmount and touch the disk.
pub trait ControlPlane: Send + Sync + 'static {
    fn status(&self) -> Status;
    fn mounts(&self) -> Vec<MountInfo>;
    fn add_mount(&self, req: MountRequest) -> Result<MountInfo, ApiError>;
    fn remove_mount(&self, req: UnmountRequest) -> Result<(), ApiError>;
    fn sessions(&self) -> Vec<SessionInfo>;
    fn session(&self, id: &str) -> Result<SessionInfo, ApiError>;
    fn create_session(&self, req: SessionRequest) -> Result<SessionInfo, ApiError>;
    fn end_session(&self, id: &str, req: EndSessionRequest) -> Result<EndReport, ApiError>;
    /// The agent SDK's storage envelope: `{"method":"session.get","id":...}` etc.; the result
    /// may be `null`.
    fn storage(&self, envelope: serde_json::Value) -> Result<serde_json::Value, ApiError>;
    /// The daemon's state for the gauges of `GET /metrics` (counters need nothing from it).
    fn metrics(&self) -> crate::metrics::Snapshot;
    /// The events of `space` (`rooms/ID` or `sessions/ID`) for a watcher with `token` (only
    /// what its grant shows) or without (everything).
    fn events(&self, space: &str, token: Option<&str>) -> Result<EventSource, ApiError>;
    /// A signed download URL (see [`crate::urls`]).
    fn sign_url(&self, req: UrlRequest) -> Result<SignedUrl, ApiError>;
}

/// Where a watcher's events come from, and what it may see of them.
pub struct EventSource {
    pub feed: std::sync::Arc<dyn crate::events::ChangeFeed>,
    /// The space's name in events (`rooms/r1`).
    pub space: String,
    /// The grant of the watcher's token; `None`: everything.
    pub grant: Option<crate::grant::Grant>,
    /// When a follower's stream must end (the daemon stops, the space is deleted).
    pub ended: crate::events::stream::EndSignal,
}

/// `POST /v1/urls`: a URL that downloads `path` of a room (or session) without credentials
/// until it expires.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UrlRequest {
    pub room: Option<String>,
    pub session: Option<String>,
    /// The file, relative to the space's root.
    pub path: String,
    /// `Content-Disposition: attachment` (a download) instead of `inline`.
    #[serde(default)]
    pub attachment: bool,
    /// How long the URL works (default 900 s, at most 7 days).
    pub ttl_secs: Option<u64>,
    /// Issue it only if this token's grant covers the path.
    pub token: Option<String>,
    /// A URL of the object store itself (S3 rooms; pending the S3 store).
    #[serde(default)]
    pub direct: bool,
}

/// A signed download URL.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SignedUrl {
    pub url: String,
    /// When it stops working, Unix seconds.
    pub expires: u64,
}

/// An error answer of the API: an HTTP status and a message for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(409, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, message)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

/// Refused input is a bad request.
impl From<crate::error::Invalid> for ApiError {
    fn from(e: crate::error::Invalid) -> ApiError {
        ApiError::bad_request(e.0)
    }
}

/// What each kind of record error means in HTTP: the caller's mistakes are 400, a missing
/// record for `update` is 404, and storage failures (including a record file that is not a
/// regular file, or a collection directory that is a symlink) are 500.
impl From<RecordError> for ApiError {
    fn from(err: RecordError) -> ApiError {
        let status = match &err {
            RecordError::BadRequest(_) | RecordError::UnknownMethod(_) => 400,
            RecordError::NotFound { .. } => 404,
            RecordError::Io(_) => 500,
        };
        ApiError::new(status, err.to_string())
    }
}

/// `GET /v1/status`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub version: String,
    pub data_dir: String,
    pub socket: String,
    pub mounts: usize,
    pub sessions: usize,
    pub uptime_secs: u64,
}

/// Limits of a space (the filesystem core's type); `None` is unlimited.
pub use crate::fs::Limits;

/// `POST /v1/mounts`: mount a room or a session at `mountpoint`.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    pub mountpoint: String,
    pub room: Option<String>,
    pub session: Option<String>,
    /// Granted prefixes, `PATH:ro` or `PATH:rw` (e.g. `inputs/:ro`); left out: the whole
    /// space (an empty list is refused, see `Grant::parse_field`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<Vec<String>>,
    pub token: Option<String>,
    pub sync_on_close: Option<bool>,
    /// Let the kernel read large files from the disk directly (default: the daemon's setting).
    #[serde(default)]
    pub passthrough: Option<bool>,
    /// Who the mount's changes are made by, in events (default: the token's name, else the
    /// mount point).
    #[serde(default)]
    pub label: Option<String>,
    /// Mount read-only: every change fails with EROFS (default: read-write).
    #[serde(default)]
    pub read_only: Option<bool>,
    /// Mount `noexec`: no file in the mount can be executed (default: executable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noexec: Option<bool>,
    /// The store the space is in (`local`, `s3://bucket/prefix`): must be the one the daemon
    /// keeps such spaces in (default: that one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

impl MountInfo {
    /// What may be done through the mount: its grant, and whether it is read-only or
    /// `noexec`.
    pub fn access(&self) -> String {
        let mut access = self.grant.clone();
        if self.read_only {
            access.push_str(", read-only mount");
        }
        if self.noexec {
            access.push_str(", noexec");
        }
        access
    }
}

/// A mount served by the daemon.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mountpoint: String,
    /// `"room"` or `"session"`.
    pub kind: String,
    pub id: String,
    /// The grant in display form.
    pub grant: String,
    /// Mounted read-only: nothing can be changed through it, whatever the grant says.
    #[serde(default)]
    pub read_only: bool,
    /// Mounted `noexec`: no file in it can be executed.
    #[serde(default)]
    pub noexec: bool,
    /// Whether the mount comes from the daemon's configuration rather than the API.
    pub from_config: bool,
}

/// `POST /v1/mounts/remove`.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UnmountRequest {
    pub mountpoint: String,
    #[serde(default)]
    pub lazy: bool,
}

/// `POST /v1/sessions`.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    pub id: String,
    /// `None`, or a field left out: the daemon's session default for it.
    #[serde(default)]
    pub limits: Option<RequestedLimits>,
    pub ttl_secs: Option<u64>,
    /// Who owns the session's root directory (so an agent running as that user can write
    /// there); `None`: the daemon's own user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<SpaceOwner>,
}

/// The limits a session is created with: a field left out is the daemon's default for it, a
/// field given as `null` is unlimited.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RequestedLimits {
    #[serde(
        default,
        deserialize_with = "given",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_file_bytes: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "given",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_files: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "given",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_bytes: Option<Option<u64>>,
}

impl RequestedLimits {
    /// The limits asked for, with `defaults` where none was asked for.
    pub fn or(self, defaults: Limits) -> Limits {
        Limits {
            max_file_bytes: self.max_file_bytes.unwrap_or(defaults.max_file_bytes),
            max_files: self.max_files.unwrap_or(defaults.max_files),
            max_bytes: self.max_bytes.unwrap_or(defaults.max_bytes),
        }
    }
}

impl From<Limits> for RequestedLimits {
    /// Exactly these limits (`None`: unlimited), whatever the defaults.
    fn from(l: Limits) -> RequestedLimits {
        RequestedLimits {
            max_file_bytes: Some(l.max_file_bytes),
            max_files: Some(l.max_files),
            max_bytes: Some(l.max_bytes),
        }
    }
}

/// A field that is present: its value, `null` included (absent fields are `default`ed).
fn given<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

/// A user and group, by number.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SpaceOwner {
    pub uid: u32,
    pub gid: u32,
}

impl SpaceOwner {
    /// Refuses ids no user or group can have: 4294967295 (`-1`) means "leave unchanged" to
    /// `chown`, so a space owned by it could never be given to it.
    pub fn check(&self) -> Result<(), crate::error::Invalid> {
        for (what, id) in [("uid", self.uid), ("gid", self.gid)] {
            if id == u32::MAX {
                return Err(crate::error::Invalid(format!(
                    "owner {what} {id} is not an id (it means \"unchanged\" to chown)"
                )));
            }
        }
        Ok(())
    }
}

/// A session known to the daemon.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: String,
    pub limits: Limits,
    pub ttl_secs: Option<u64>,
    /// Unix time in milliseconds.
    pub created_at: u64,
    /// Unix time in milliseconds.
    pub last_active: u64,
    /// When the session ends unless it is active before (Unix ms; none without a TTL): a TTL
    /// after its last activity, or after the daemon's start if that is later.
    #[serde(default)]
    pub ends_at: Option<u64>,
    pub files: u64,
    pub bytes: u64,
    /// Mount points serving the session.
    pub mounts: Vec<String>,
}

/// `POST /v1/sessions/{id}/end`.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EndSessionRequest {
    /// Paths inside the session to copy into `to_room` before deleting it (e.g. `outputs/`).
    #[serde(default)]
    pub export: Vec<String>,
    pub to_room: Option<String>,
}

/// What ending a session did.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct EndReport {
    pub id: String,
    pub deleted_files: u64,
    pub deleted_records: u64,
    pub exported: Vec<String>,
    pub unmounted: Vec<String>,
}

#[cfg(test)]
mod tests;
