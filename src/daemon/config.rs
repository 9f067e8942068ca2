//! The daemon's configuration file: JSON, every field optional.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use crate::error::Invalid;
use crate::events::Retention;
use crate::fs::Limits;
use crate::space::{SpaceId, SpaceKind};
use crate::store::StoreConfig;

/// `roomfs serve --config FILE`. Unknown fields are an error, so a typo never goes unnoticed.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where spaces live (default: /var/lib/roomfs, or the XDG data dir when not root).
    pub data_dir: Option<PathBuf>,
    /// The control socket (default /run/roomfs/control.sock).
    pub socket: Option<PathBuf>,
    /// Where agent records live (default <data_dir>/records).
    pub records_dir: Option<PathBuf>,
    /// The secret that grant tokens are signed with (needed for mounts with a token).
    pub secret_file: Option<PathBuf>,
    /// Make every close durable (fsync), not only fsync() calls.
    pub sync_on_close: bool,
    /// Let the kernel read large files from the disk directly (FUSE passthrough).
    pub passthrough: bool,
    /// Seconds the kernel caches attributes and names.
    pub cache_ttl_secs: f64,
    /// Threads serving each mount (default: by its store, see `StoreConfig::default_threads`).
    pub threads: Option<usize>,
    /// Microseconds idle CPUs are kept from halting after a request (0: off); see
    /// doc/PERFORMANCE.md, Levers.
    pub poll_window_us: u64,
    /// Limits of new sessions unless `session create` gives others.
    #[serde(deserialize_with = "session_limits")]
    pub session_limits: Limits,
    /// End sessions after this many seconds without activity (none: never).
    pub session_ttl_secs: Option<u64>,
    /// Limits of every room (default: unlimited).
    #[serde(deserialize_with = "room_limits")]
    pub room_limits: Limits,
    /// Where rooms are stored: `"local"` (the data dir), or an S3 bucket:
    /// `{"s3": {"bucket": ..., "prefix": ..., ...}}` or `"s3://bucket/prefix"`.
    pub store: StoreConfig,
    /// Where sessions are stored (default: `"local"`: they are one host's scratch).
    pub session_store: StoreConfig,
    /// Mounts to set up at start (and again after every restart).
    #[serde(deserialize_with = "mounts")]
    pub mounts: Vec<ConfigMount>,
    /// How many events each space keeps for watchers that resume (count and/or age).
    #[serde(deserialize_with = "event_retention")]
    pub event_retention: Retention,
    /// Serve signed download URLs over HTTP on this address (`127.0.0.1:8080`); off without.
    pub http_listen: Option<String>,
    /// The base of the URLs `roomfs url` prints (`https://files.example.com`), where a proxy
    /// or another daemon serves them; default `http://<http_listen>`.
    pub http_public_url: Option<String>,
}

/// A struct of the configuration, from a JSON object only: serde also reads structs from
/// arrays, by position (`[10, 100]` as limits), which no one means.
/// The error names the field.
fn object<'de, D, T>(d: D, field: &str) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        value @ serde_json::Value::Object(_) => {
            serde_json::from_value(value).map_err(|e| D::Error::custom(format!("{field}: {e}")))
        }
        other => Err(D::Error::custom(format!(
            "{field} must be a JSON object, not {}",
            json_kind(&other)
        ))),
    }
}

fn session_limits<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Limits, D::Error> {
    object(d, "session_limits")
}

fn room_limits<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Limits, D::Error> {
    object(d, "room_limits")
}

fn event_retention<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Retention, D::Error> {
    object(d, "event_retention")
}

/// `mounts`: a list of [`object`]s.
fn mounts<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ConfigMount>, D::Error> {
    Vec::<serde_json::Value>::deserialize(d)?
        .into_iter()
        .enumerate()
        .map(|(i, item)| object(item, &format!("mounts[{i}]")).map_err(serde::de::Error::custom))
        .collect()
}

/// What a JSON value is, in words.
pub fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A records dir the operator named (`what`: the field or flag): it must exist, as a typo
/// must not become an empty record store.
pub fn named_records_dir<'a>(dir: &'a Path, what: &str) -> Result<&'a Path, Invalid> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Invalid(format!(
            "{what} {} does not exist: create it (or leave {what} out for <data_dir>/records)",
            dir.display()
        ))),
        _ => Ok(dir),
    }
}

/// A mount listed in the configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigMount {
    pub mountpoint: PathBuf,
    #[serde(default)]
    pub room: Option<String>,
    #[serde(default)]
    pub session: Option<String>,
    /// Granted prefixes, "PATH:ro" or "PATH:rw"; left out: full access (an empty list is
    /// refused, see `Grant::parse_field`).
    #[serde(default)]
    pub grant: Option<Vec<String>>,
    /// A signed grant token instead of `room` and `grant`.
    #[serde(default)]
    pub token: Option<String>,
    /// Who the mount's changes are made by, in events (default: the token's name, else the
    /// mount point).
    #[serde(default)]
    pub label: Option<String>,
}

/// Session limits mirroring common agent platforms: 10 MB a file, 100 files, 50 MB in all.
pub const DEFAULT_SESSION_LIMITS: Limits = Limits {
    max_file_bytes: Some(10 * 1000 * 1000),
    max_files: Some(100),
    max_bytes: Some(50 * 1000 * 1000),
};

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: None,
            socket: None,
            records_dir: None,
            secret_file: None,
            sync_on_close: false,
            passthrough: true,
            cache_ttl_secs: 1.0,
            threads: None,
            poll_window_us: 1000,
            session_limits: DEFAULT_SESSION_LIMITS,
            session_ttl_secs: None,
            room_limits: Limits::default(),
            store: StoreConfig::Local,
            session_store: StoreConfig::Local,
            mounts: Vec::new(),
            event_retention: Retention::default(),
            http_listen: None,
            http_public_url: None,
        }
    }
}

impl Config {
    /// Reads and checks a configuration file; the error names the file and what is wrong.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        // serde reads a struct from an array too, by position: `["/data", "/run/x.sock"]`
        // would be taken as data_dir and socket.
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(&text)
            && !value.is_object()
        {
            return Err(Invalid(format!(
                "config {} must be a JSON object ({{\"field\": value, ...}}), not {}",
                path.display(),
                json_kind(&value)
            ))
            .into());
        }
        let config: Config =
            serde_json::from_str(&text).with_context(|| format!("config {}", path.display()))?;
        config
            .check()
            .with_context(|| format!("config {}", path.display()))?;
        Ok(config)
    }

    /// Where agent records live: `records_dir`, which must exist (a typo would otherwise be
    /// made, as root, into an empty record store), or `<data_dir>/records`, made if missing.
    pub fn records_dir(&self, data_dir: &Path) -> Result<PathBuf, Invalid> {
        match &self.records_dir {
            Some(dir) => named_records_dir(dir, "records_dir").map(Path::to_path_buf),
            None => Ok(data_dir.join("records")),
        }
    }

    /// Checks values serde cannot.
    pub fn check(&self) -> Result<(), Invalid> {
        if !(self.cache_ttl_secs.is_finite() && (0.0..=3600.0).contains(&self.cache_ttl_secs)) {
            return Err(Invalid(format!(
                "cache_ttl_secs must be between 0 and 3600, not {}",
                self.cache_ttl_secs
            )));
        }
        if self.poll_window_us > 1_000_000 {
            return Err(Invalid(format!(
                "poll_window_us must be at most 1000000, not {}",
                self.poll_window_us
            )));
        }
        if let Some(threads) = self.threads
            && !(1..=64).contains(&threads)
        {
            return Err(Invalid(format!(
                "threads must be between 1 and 64, not {threads}"
            )));
        }
        self.event_retention.check()?;
        if self.session_ttl_secs == Some(0) {
            return Err(Invalid(
                "session_ttl_secs must be at least 1 (or null: sessions do not expire)".into(),
            ));
        }
        crate::space::state::check_ttl("session_ttl_secs", self.session_ttl_secs)
            .map_err(Invalid)?;
        if let Some(addr) = &self.http_listen
            && addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(Invalid(format!(
                "http_listen must be an address and port like 127.0.0.1:8080, not {addr:?}"
            )));
        }
        if let Some(url) = &self.http_public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(Invalid(format!(
                "http_public_url must start with http:// or https://, not {url:?}"
            )));
        }
        if self.http_listen.is_some() && self.secret_file.is_none() {
            return Err(Invalid(
                "http_listen needs secret_file: download URLs are signed with it".into(),
            ));
        }
        for (i, m) in self.mounts.iter().enumerate() {
            let spaces = usize::from(m.room.is_some()) + usize::from(m.session.is_some());
            if m.token.is_none() && spaces != 1 {
                return Err(Invalid(format!(
                    "mounts[{i}]: give exactly one of \"room\" or \"session\""
                )));
            }
            if m.token.is_some() && (m.session.is_some() || m.grant.is_some()) {
                return Err(Invalid(format!(
                    "mounts[{i}]: a \"token\" carries the room and grant; drop \"session\"/\"grant\""
                )));
            }
            if !m.mountpoint.is_absolute() {
                return Err(Invalid(format!(
                    "mounts[{i}]: mountpoint must be an absolute path"
                )));
            }
            // What can never be mounted stops the start; what cannot be mounted now (a session
            // since ended, a path in use) is logged, and the rest is served.
            let at = |e: &dyn std::fmt::Display| Invalid(format!("mounts[{i}]: {e}"));
            if let Some(id) = &m.room {
                SpaceId::new(SpaceKind::Room, id).map_err(|e| at(&e))?;
            }
            if let Some(id) = &m.session {
                SpaceId::new(SpaceKind::Session, id).map_err(|e| at(&e))?;
            }
            crate::grant::Grant::parse_field(m.grant.as_deref()).map_err(|e| at(&e))?;
            if let Some(label) = &m.label {
                crate::events::check_label(label).map_err(|e| at(&e))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config in `text`, or its error as the one line the CLI prints.
    fn parse(text: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        std::fs::write(&p, text).unwrap();
        Config::load(&p).map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn every_field_is_optional() {
        assert_eq!(parse("{}").unwrap(), Config::default());
        let c = parse(
            r#"{"session_limits": {"max_files": 5}, "mounts": [{"mountpoint": "/m", "room": "r"}]}"#,
        )
        .unwrap();
        assert_eq!(c.session_limits.max_files, Some(5));
        assert_eq!(c.session_limits.max_bytes, None);
        assert_eq!(c.mounts[0].room.as_deref(), Some("r"));
        assert!(Config::default().passthrough);
        assert!(!parse(r#"{"passthrough": false}"#).unwrap().passthrough);
    }

    #[test]
    fn unknown_and_invalid_fields_are_clear_errors() {
        let e = parse(r#"{"data_dri": "/x"}"#).unwrap_err();
        assert!(e.contains("unknown field `data_dri`"), "{e}");
        let e = parse(r#"{"threads": 0}"#).unwrap_err();
        assert!(e.contains("threads"), "{e}");
        let e = parse(r#"{"mounts": [{"mountpoint": "/m"}]}"#).unwrap_err();
        assert!(e.contains("mounts[0]"), "{e}");
        let e = parse(r#"{"mounts": [{"mountpoint": "rel", "room": "r"}]}"#).unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        let e = parse(r#"{"session_limits": {"max_file": 1}}"#).unwrap_err();
        assert!(e.contains("max_file"), "{e}");
        let e = parse("{").unwrap_err();
        assert!(e.contains("EOF"), "{e}");
        // What no start could mount stops the start (naming the field), not just a log line.
        for (bad, says) in [
            (
                r#"{"session_ttl_secs": 0}"#,
                "session_ttl_secs must be at least 1",
            ),
            (
                r#"{"session_ttl_secs": 18446744073709551615}"#,
                "session_ttl_secs must be at most 315360000",
            ),
            (
                r#"{"mounts": [{"mountpoint": "/m", "room": "bad/id"}]}"#,
                "mounts[0]: invalid room id \"bad/id\"",
            ),
            (
                r#"{"mounts": [{"mountpoint": "/m", "session": ".x"}]}"#,
                "mounts[0]: invalid session id",
            ),
            (
                r#"{"mounts": [{"mountpoint": "/m", "room": "r", "grant": ["a/:rx"]}]}"#,
                "mounts[0]: ",
            ),
            (
                r#"{"mounts": [{"mountpoint": "/m", "room": "r", "grant": []}]}"#,
                "mounts[0]: an empty grant grants nothing",
            ),
            (
                r#"{"mounts": [{"mountpoint": "/m", "room": "r", "label": ""}]}"#,
                "mounts[0]: label \"\" must be 1 to 200 bytes",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(parse(r#"{"session_ttl_secs": 1}"#).is_ok());
    }

    #[test]
    fn the_config_and_its_structs_are_json_objects_not_arrays_read_by_position() {
        for (bad, says) in [
            (r#"["/data", "/run/x.sock"]"#, "must be a JSON object"),
            ("[]", "not an array"),
            ("null", "not null"),
            ("\"x\"", "not a string"),
            (
                r#"{"session_limits": [10, 100, 1000]}"#,
                "session_limits must be a JSON object, not an array",
            ),
            (
                r#"{"room_limits": [10]}"#,
                "room_limits must be a JSON object, not an array",
            ),
            (
                r#"{"event_retention": [10, 60]}"#,
                "event_retention must be a JSON object, not an array",
            ),
            (
                r#"{"mounts": [["/m", "r1"]]}"#,
                "mounts[0] must be a JSON object, not an array",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says) && e.contains("c.json"), "{bad}: {e}");
        }
        // Objects still are read, with what is wrong in them named.
        let c = parse(r#"{"session_limits": {"max_files": 3}, "event_retention": {}}"#).unwrap();
        assert_eq!(c.session_limits.max_files, Some(3));
        let e = parse(r#"{"mounts": [{"mountpoint": "/m", "rom": "r"}]}"#).unwrap_err();
        assert!(e.contains("mounts[0]: unknown field `rom`"), "{e}");
    }

    #[test]
    fn stores_are_local_or_s3_as_an_object_or_a_url() {
        assert_eq!(parse("{}").unwrap().store, StoreConfig::Local);
        let c = parse(
            r#"{"store": {"s3": {"bucket": "team-a", "prefix": "agents", "endpoint":
                "http://127.0.0.1:8333", "part_size": "16Mi", "cache_bytes": 1048576}}}"#,
        )
        .unwrap();
        let StoreConfig::S3(s3) = &c.store else {
            panic!("an S3 store: {:?}", c.store)
        };
        assert_eq!(
            (s3.bucket.as_str(), s3.prefix.as_str()),
            ("team-a", "agents")
        );
        assert_eq!((s3.part_size, s3.cache_bytes), (16 << 20, 1 << 20));
        assert_eq!(c.session_store, StoreConfig::Local);
        let c = parse(r#"{"session_store": "s3://team-b/x?part_size=5Mi"}"#).unwrap();
        assert_eq!(c.session_store.name(), "s3://team-b/x");
        for (bad, says) in [
            (r#"{"store": "nfs"}"#, "expected local or s3://"),
            (
                r#"{"store": {"s3": ["b", "p"]}}"#,
                "s3: expected a JSON object, found an array",
            ),
            (
                r#"{"store": {"s3": {"bucket": "b", "partsize": 1}}}"#,
                "unknown field `partsize`",
            ),
            (
                r#"{"store": {"s3": {"bucket": "ok-bucket", "part_size": 1}}}"#,
                "part_size",
            ),
            (r#"{"store": {"s3": {"bucket": "Bad_Name"}}}"#, "bucket"),
            (r#"{"store": "s3://b/../x"}"#, "bucket"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
