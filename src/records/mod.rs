//! Agent session records: the record model of the `experimental-agent` SDK's storage
//! (sessions, messages, parts, sandboxes, setups), kept on disk in the SDK's `localStorage()`
//! layout `<dir>/<collection>/<id>.json`, so an existing `.agent/` directory is served as is.
//!
//! Records are JSON objects stored as [`serde_json::Value`]s: only the fields needed to file and
//! relate them are checked (`id` for all; `sessionId` for messages and parts; `messageId` and a
//! non-negative integer `index` for parts). Every other field, known or not, round-trips: a
//! record written is read back equal as a JSON value (key order and number spelling may change).
//!
//! Orders used by listings and the `.meta` view:
//! - **message order**: `createdAt` ascending (numeric; records without a numeric `createdAt`
//!   come after those with one), then id;
//! - **part order**: by the message-order position of the part's message, then `index`, then id;
//!   parts whose `messageId` names no message of the session come after all others, grouped by
//!   `messageId` (string order).
//!
//! [`RecordStore::version`] only sees writes made through the store; changes made to the
//! directory behind its back are not detected.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde_json::{Map, Value, json};

/// Longest accepted id, in bytes (ids become file names).
const MAX_ID_LEN: usize = 200;
/// Name prefix of temporary files; ids cannot start with `.`, so these never clash with records.
const TMP_PREFIX: &str = ".tmp-";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Collection {
    Session,
    Message,
    Part,
    Sandbox,
    Setup,
}

impl Collection {
    const ALL: [Collection; 5] = [
        Collection::Session,
        Collection::Message,
        Collection::Part,
        Collection::Sandbox,
        Collection::Setup,
    ];

    /// Directory name and method prefix.
    fn name(self) -> &'static str {
        match self {
            Collection::Session => "session",
            Collection::Message => "message",
            Collection::Part => "part",
            Collection::Sandbox => "sandbox",
            Collection::Setup => "setup",
        }
    }

    fn from_name(name: &str) -> Option<Collection> {
        Collection::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// The collections whose records belong to a session (through their `sessionId`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChildCollection {
    Message,
    Part,
}

impl ChildCollection {
    fn collection(self) -> Collection {
        match self {
            ChildCollection::Message => Collection::Message,
            ChildCollection::Part => Collection::Part,
        }
    }
}

/// One file of a session's `.meta` view.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MetaPath {
    Session,
    History,
    Message(String),
    Part(String),
}

/// A session's whole `.meta` view, each file rendered as pretty-printed JSON plus a newline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaView {
    pub session: Vec<u8>,
    /// Message id → record, for every message whose `sessionId` is this session.
    pub messages: BTreeMap<String, Vec<u8>>,
    /// Part id → record, for every part whose `sessionId` is this session.
    pub parts: BTreeMap<String, Vec<u8>>,
    /// `{"session": …, "messages": [message + "parts": [its parts in index order]]}` in message
    /// order. A `parts` field of a stored message is replaced; parts whose message is not in
    /// the session appear in `parts` only.
    pub history: Vec<u8>,
}

#[derive(Debug)]
pub enum RecordError {
    BadRequest(String),
    UnknownMethod(String),
    NotFound {
        collection: &'static str,
        id: String,
    },
    Io(io::Error),
}

impl RecordError {
    pub fn http_status(&self) -> u16 {
        match self {
            RecordError::BadRequest(_) | RecordError::UnknownMethod(_) => 400,
            RecordError::NotFound { .. } => 404,
            RecordError::Io(_) => 500,
        }
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::BadRequest(msg) => write!(f, "bad request: {msg}"),
            RecordError::UnknownMethod(method) => write!(f, "unknown method {method:?}"),
            RecordError::NotFound { collection, id } => {
                write!(f, "no {collection} record with id {id:?}")
            }
            RecordError::Io(err) => write!(f, "record storage failed: {err}"),
        }
    }
}

impl std::error::Error for RecordError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RecordError::Io(err) => Some(err),
            _ => None,
        }
    }
}

impl From<io::Error> for RecordError {
    fn from(err: io::Error) -> Self {
        RecordError::Io(err)
    }
}

fn bad(msg: impl Into<String>) -> RecordError {
    RecordError::BadRequest(msg.into())
}

/// Records as (id from the file name, record).
type Records = Vec<(String, Value)>;

/// Last version handed out, and the version of each session touched by a write.
#[derive(Default)]
struct Versions {
    last: u64,
    by_session: HashMap<String, u64>,
}

pub struct RecordStore {
    dir: PathBuf,
    /// Held by every mutation, so read-modify-write and version bumps are atomic. Reads don't
    /// take it: each record file is replaced by an atomic rename.
    write_lock: Mutex<()>,
    versions: Mutex<Versions>,
    tmp_seq: AtomicU64,
}

impl RecordStore {
    /// Opens (creating missing directories) the store at `dir` and removes temporary files
    /// left by interrupted writes.
    pub fn open(dir: &Path) -> io::Result<RecordStore> {
        for collection in Collection::ALL {
            let sub = dir.join(collection.name());
            fs::create_dir_all(&sub)?;
            remove_temp_files(&sub)?;
        }
        Ok(RecordStore {
            dir: dir.to_path_buf(),
            write_lock: Mutex::new(()),
            versions: Mutex::new(Versions::default()),
            tmp_seq: AtomicU64::new(0),
        })
    }

    /// Runs one storage-handler request, e.g. `{"method":"session.get","id":"ses_1"}`.
    ///
    /// `get` returns the record or `null`; `set` returns `null`; `update` shallow-merges
    /// `updates` into the stored record and returns the result; `listBySession` returns an
    /// array in message or part order (see the module docs). `set` inserts `id` into a `value`
    /// without one, and refuses a `value.id` different from `id`; `update` likewise refuses an
    /// `updates.id` different from `id`.
    pub fn handle(&self, req: &Value) -> Result<Value, RecordError> {
        let req = req
            .as_object()
            .ok_or_else(|| bad("the request must be a JSON object"))?;
        let method = str_param(req, "method")?;
        let unknown = || RecordError::UnknownMethod(method.to_owned());
        let (collection, op) = method
            .split_once('.')
            .and_then(|(c, op)| Some((Collection::from_name(c)?, op)))
            .ok_or_else(unknown)?;
        match (collection, op) {
            (_, "get") => Ok(self
                .read(collection, id_param(req)?)?
                .unwrap_or(Value::Null)),
            (_, "set") => {
                let id = id_param(req)?;
                self.set(collection, id, obj_param(req, "value")?.clone())?;
                Ok(Value::Null)
            }
            (Collection::Session | Collection::Message | Collection::Sandbox, "update") => {
                self.update(collection, id_param(req)?, obj_param(req, "updates")?)
            }
            (Collection::Message | Collection::Part, "listBySession") => {
                let session_id = str_param(req, "sessionId")?;
                let messages = self.messages_of(session_id)?;
                let records = if collection == Collection::Message {
                    messages
                } else {
                    self.parts_of(session_id, &messages)?
                };
                Ok(Value::Array(records.into_iter().map(|(_, v)| v).collect()))
            }
            _ => Err(unknown()),
        }
    }

    /// Removes a session record and every message and part whose `sessionId` is `session_id`;
    /// returns how many files were removed.
    pub fn delete_session(&self, session_id: &str) -> io::Result<usize> {
        check_id(session_id)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err.to_string()))?;
        let _guard = lock(&self.write_lock);
        let mut removed = 0;
        // Children first: an interrupted deletion leaves the session record to retry with.
        for collection in [Collection::Message, Collection::Part] {
            for (id, _) in self.records_of(collection, session_id)? {
                removed += usize::from(remove_if_exists(&self.path(collection, &id))?);
            }
            sync_dir(&self.collection_dir(collection))?;
        }
        removed += usize::from(remove_if_exists(
            &self.path(Collection::Session, session_id),
        )?);
        sync_dir(&self.collection_dir(Collection::Session))?;
        self.bump(&[session_id]);
        Ok(removed)
    }

    /// The whole `.meta` view of a session, or `None` if its session record doesn't exist.
    pub fn meta_view(&self, session_id: &str) -> io::Result<Option<MetaView>> {
        let Some(session) = self.session_record(session_id)? else {
            return Ok(None);
        };
        let (messages, parts) = self.children(session_id)?;
        let render_all = |records: &[(String, Value)]| {
            records
                .iter()
                .map(|(id, v)| (id.clone(), render(v)))
                .collect()
        };
        Ok(Some(MetaView {
            session: render(&session),
            messages: render_all(&messages),
            parts: render_all(&parts),
            history: render(&history(&session, &messages, &parts)),
        }))
    }

    /// One file of [`RecordStore::meta_view`], reading only what it needs (`History` still
    /// scans the session's messages and parts). `None` if the session or the record doesn't
    /// exist, or the record belongs to another session.
    pub fn meta_file(&self, session_id: &str, path: &MetaPath) -> io::Result<Option<Vec<u8>>> {
        let Some(session) = self.session_record(session_id)? else {
            return Ok(None);
        };
        let value = match path {
            MetaPath::Session => Some(session),
            MetaPath::History => {
                let (messages, parts) = self.children(session_id)?;
                Some(history(&session, &messages, &parts))
            }
            MetaPath::Message(id) => self.child(Collection::Message, id, session_id)?,
            MetaPath::Part(id) => self.child(Collection::Part, id, session_id)?,
        };
        Ok(value.map(|v| render(&v)))
    }

    /// Ids (sorted) of the session's messages or parts, as keyed in [`MetaView`]; `None` if the
    /// session record doesn't exist.
    pub fn list_ids(
        &self,
        collection: ChildCollection,
        session_id: &str,
    ) -> io::Result<Option<Vec<String>>> {
        if self.session_record(session_id)?.is_none() {
            return Ok(None);
        }
        let records = self.records_of(collection.collection(), session_id)?;
        Ok(Some(records.into_iter().map(|(id, _)| id).collect()))
    }

    /// Changes after every write through this store that touches the session (its record, or
    /// a message or part that belongs or belonged to it); 0 if none happened since `open`.
    pub fn version(&self, session_id: &str) -> u64 {
        let versions = lock(&self.versions);
        versions.by_session.get(session_id).copied().unwrap_or(0)
    }

    fn set(
        &self,
        collection: Collection,
        id: &str,
        mut value: Map<String, Value>,
    ) -> Result<(), RecordError> {
        match value.get("id") {
            None => {
                value.insert("id".to_owned(), Value::String(id.to_owned()));
            }
            Some(Value::String(given)) if given == id => {}
            Some(given) => {
                return Err(bad(format!("value.id {given} does not match id {id:?}")));
            }
        }
        validate(collection, &value)?;
        let value = Value::Object(value);
        let _guard = lock(&self.write_lock);
        // An unreadable previous record cannot be attributed to a session; overwriting it is fine.
        let old = self.read(collection, id).ok().flatten();
        self.write(collection, id, &value)?;
        self.touched(collection, id, old.as_ref(), &value);
        Ok(())
    }

    fn update(
        &self,
        collection: Collection,
        id: &str,
        updates: &Map<String, Value>,
    ) -> Result<Value, RecordError> {
        if let Some(given) = updates.get("id").filter(|given| given.as_str() != Some(id)) {
            return Err(bad(format!("updates.id {given} does not match id {id:?}")));
        }
        let _guard = lock(&self.write_lock);
        let old = self
            .read(collection, id)?
            .ok_or_else(|| RecordError::NotFound {
                collection: collection.name(),
                id: id.to_owned(),
            })?;
        let Value::Object(mut merged) = old.clone() else {
            return Err(RecordError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "stored {} record {id:?} is not a JSON object",
                    collection.name()
                ),
            )));
        };
        merged.extend(updates.iter().map(|(k, v)| (k.clone(), v.clone())));
        validate(collection, &merged)?;
        let merged = Value::Object(merged);
        self.write(collection, id, &merged)?;
        self.touched(collection, id, Some(&old), &merged);
        Ok(merged)
    }

    /// Bumps the versions of the sessions a write of `new` over `old` affects.
    fn touched(&self, collection: Collection, id: &str, old: Option<&Value>, new: &Value) {
        match collection {
            Collection::Session => self.bump(&[id]),
            Collection::Message | Collection::Part => {
                let sessions: Vec<&str> = [old.and_then(session_id_of), session_id_of(new)]
                    .into_iter()
                    .flatten()
                    .collect();
                self.bump(&sessions);
            }
            Collection::Sandbox | Collection::Setup => {}
        }
    }

    fn bump(&self, sessions: &[&str]) {
        let mut versions = lock(&self.versions);
        versions.last += 1;
        let version = versions.last;
        for session in sessions {
            versions.by_session.insert((*session).to_owned(), version);
        }
    }

    fn collection_dir(&self, collection: Collection) -> PathBuf {
        self.dir.join(collection.name())
    }

    fn path(&self, collection: Collection, id: &str) -> PathBuf {
        self.collection_dir(collection).join(format!("{id}.json"))
    }

    /// Reads one record; `id` must already be checked.
    fn read(&self, collection: Collection, id: &str) -> io::Result<Option<Value>> {
        let path = self.path(collection, id);
        match fs::read(&path) {
            Ok(bytes) => parse_record(&bytes, &path).map(Some),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// The session record, or `None` if it doesn't exist or `session_id` can't be a file name.
    fn session_record(&self, session_id: &str) -> io::Result<Option<Value>> {
        if check_id(session_id).is_err() {
            return Ok(None);
        }
        self.read(Collection::Session, session_id)
    }

    fn child(
        &self,
        collection: Collection,
        id: &str,
        session_id: &str,
    ) -> io::Result<Option<Value>> {
        if check_id(id).is_err() {
            return Ok(None);
        }
        Ok(self
            .read(collection, id)?
            .filter(|v| session_id_of(v) == Some(session_id)))
    }

    /// All records of a collection, as (id from the file name, record), sorted by id. Files
    /// that don't parse are skipped with a warning, so one damaged file can't hide the rest.
    fn scan(&self, collection: Collection) -> io::Result<Records> {
        let mut records = Vec::new();
        for entry in fs::read_dir(self.collection_dir(collection))? {
            let entry = entry?;
            let file_name = entry.file_name();
            let Some(id) = file_name
                .to_str()
                .and_then(|name| name.strip_suffix(".json"))
                .filter(|id| check_id(id).is_ok())
            else {
                continue;
            };
            let path = entry.path();
            let bytes = match fs::read(&path) {
                Ok(bytes) => bytes,
                // Deleted since read_dir listed it.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            match parse_record(&bytes, &path) {
                Ok(value) => records.push((id.to_owned(), value)),
                Err(err) => log::warn!("skipping unreadable record: {err}"),
            }
        }
        records.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(records)
    }

    /// The records of `collection` whose `sessionId` is `session_id`, sorted by id.
    fn records_of(&self, collection: Collection, session_id: &str) -> io::Result<Records> {
        let mut records = self.scan(collection)?;
        records.retain(|(_, v)| session_id_of(v) == Some(session_id));
        Ok(records)
    }

    /// The session's messages, in message order.
    fn messages_of(&self, session_id: &str) -> io::Result<Records> {
        let mut messages = self.records_of(Collection::Message, session_id)?;
        messages.sort_by(|a, b| cmp_created_at(&a.1, &b.1).then_with(|| a.0.cmp(&b.0)));
        Ok(messages)
    }

    /// The session's parts in part order; `messages` are the session's, in message order.
    fn parts_of(&self, session_id: &str, messages: &[(String, Value)]) -> io::Result<Records> {
        let position: HashMap<&str, usize> = messages
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (id.as_str(), i))
            .collect();
        let mut parts = self.records_of(Collection::Part, session_id)?;
        parts.sort_by_cached_key(|(id, part)| {
            let message_id = str_field(part, "messageId").unwrap_or_default();
            (
                position.get(message_id).copied().unwrap_or(usize::MAX),
                message_id.to_owned(),
                part.get("index")
                    .and_then(Value::as_u64)
                    .unwrap_or(u64::MAX),
                id.clone(),
            )
        });
        Ok(parts)
    }

    /// The session's messages and parts, in message and part order.
    fn children(&self, session_id: &str) -> io::Result<(Records, Records)> {
        let messages = self.messages_of(session_id)?;
        let parts = self.parts_of(session_id, &messages)?;
        Ok((messages, parts))
    }

    /// Replaces a record atomically: temp file in the same directory, fsync, rename, fsync dir.
    fn write(&self, collection: Collection, id: &str, value: &Value) -> io::Result<()> {
        let dir = self.collection_dir(collection);
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("{TMP_PREFIX}{}-{seq}", std::process::id()));
        let result = (|| {
            let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            file.write_all(&render(value))?;
            file.sync_all()?;
            fs::rename(&tmp, self.path(collection, id))?;
            sync_dir(&dir)
        })();
        if result.is_err() {
            // Best effort: after a successful rename the temp file is already gone.
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent even if a holder panicked.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Refuses ids that can't safely be used as a file name in a collection directory.
fn check_id(id: &str) -> Result<(), RecordError> {
    let problem = if id.is_empty() {
        "it is empty"
    } else if id.len() > MAX_ID_LEN {
        "it is longer than 200 bytes"
    } else if id.starts_with('.') {
        "it starts with '.'"
    } else if id.contains('/') {
        "it contains '/'"
    } else if id.contains('\0') {
        "it contains NUL"
    } else {
        return Ok(());
    };
    Err(bad(format!("invalid id {id:?}: {problem}")))
}

fn str_param<'a>(req: &'a Map<String, Value>, name: &str) -> Result<&'a str, RecordError> {
    match req.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(bad(format!("param `{name}` must be a string"))),
        None => Err(bad(format!("missing param `{name}`"))),
    }
}

fn id_param(req: &Map<String, Value>) -> Result<&str, RecordError> {
    let id = str_param(req, "id")?;
    check_id(id)?;
    Ok(id)
}

fn obj_param<'a>(
    req: &'a Map<String, Value>,
    name: &str,
) -> Result<&'a Map<String, Value>, RecordError> {
    match req.get(name) {
        Some(Value::Object(obj)) => Ok(obj),
        Some(_) => Err(bad(format!("param `{name}` must be a JSON object"))),
        None => Err(bad(format!("missing param `{name}`"))),
    }
}

/// Checks the fields a record of `collection` needs (besides `id`, checked by the caller).
fn validate(collection: Collection, record: &Map<String, Value>) -> Result<(), RecordError> {
    let name = collection.name();
    let require_string = |field: &str| match record.get(field) {
        Some(Value::String(_)) => Ok(()),
        _ => Err(bad(format!("{name} field `{field}` must be a string"))),
    };
    match collection {
        Collection::Message => require_string("sessionId"),
        Collection::Part => {
            require_string("sessionId")?;
            require_string("messageId")?;
            match record.get("index").and_then(Value::as_u64) {
                Some(_) => Ok(()),
                None => Err(bad(format!(
                    "{name} field `index` must be a non-negative integer"
                ))),
            }
        }
        Collection::Session | Collection::Sandbox | Collection::Setup => Ok(()),
    }
}

fn str_field<'a>(record: &'a Value, field: &str) -> Option<&'a str> {
    record.get(field).and_then(Value::as_str)
}

fn session_id_of(record: &Value) -> Option<&str> {
    str_field(record, "sessionId")
}

fn cmp_created_at(a: &Value, b: &Value) -> CmpOrdering {
    let created = |v: &Value| v.get("createdAt").and_then(Value::as_f64);
    match (created(a), created(b)) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => CmpOrdering::Less,
        (None, Some(_)) => CmpOrdering::Greater,
        (None, None) => CmpOrdering::Equal,
    }
}

/// The history document; `messages` and `parts` must be in message and part order.
fn history(session: &Value, messages: &[(String, Value)], parts: &[(String, Value)]) -> Value {
    let mut parts_of: HashMap<&str, Vec<Value>> = HashMap::new();
    for (_, part) in parts {
        if let Some(message_id) = str_field(part, "messageId") {
            parts_of.entry(message_id).or_default().push(part.clone());
        }
    }
    let messages: Vec<Value> = messages
        .iter()
        .map(|(id, message)| {
            let mut message = message.clone();
            if let Value::Object(fields) = &mut message {
                let parts = parts_of.remove(id.as_str()).unwrap_or_default();
                fields.insert("parts".to_owned(), Value::Array(parts));
            }
            message
        })
        .collect();
    json!({ "session": session, "messages": messages })
}

/// Pretty-printed JSON with a trailing newline.
fn render(value: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("a JSON value always serialises");
    bytes.push(b'\n');
    bytes
}

fn parse_record(bytes: &[u8], path: &Path) -> io::Result<Value> {
    serde_json::from_slice(bytes).map_err(|err| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {err}", path.display()),
        )
    })
}

fn remove_if_exists(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err),
    }
}

fn remove_temp_files(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            log::info!("removing leftover temp file {}", entry.path().display());
            remove_if_exists(&entry.path())?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tempfile::TempDir;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/agent-records");

    /// Every fixture as (collection, id, parsed record).
    fn fixtures() -> Vec<(&'static str, String, Value)> {
        let mut all = Vec::new();
        for collection in Collection::ALL {
            let dir = Path::new(FIXTURES).join(collection.name());
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let id = path.file_stem().unwrap().to_str().unwrap().to_owned();
                let value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
                all.push((collection.name(), id, value));
            }
        }
        all.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        assert_eq!(all.len(), 15);
        all
    }

    fn fixture(collection: &str, id: &str) -> Value {
        let path = Path::new(FIXTURES)
            .join(collection)
            .join(format!("{id}.json"));
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    /// A copy of the fixture directory, served as is.
    fn served() -> (TempDir, RecordStore) {
        let tmp = TempDir::new().unwrap();
        for collection in Collection::ALL {
            let dst = tmp.path().join(collection.name());
            fs::create_dir(&dst).unwrap();
            for entry in fs::read_dir(Path::new(FIXTURES).join(collection.name())).unwrap() {
                let entry = entry.unwrap();
                fs::write(dst.join(entry.file_name()), fs::read(entry.path()).unwrap()).unwrap();
            }
        }
        let store = RecordStore::open(tmp.path()).unwrap();
        (tmp, store)
    }

    fn empty() -> (TempDir, RecordStore) {
        let tmp = TempDir::new().unwrap();
        let store = RecordStore::open(tmp.path()).unwrap();
        (tmp, store)
    }

    fn call(store: &RecordStore, req: Value) -> Value {
        store
            .handle(&req)
            .unwrap_or_else(|err| panic!("{req}: {err}"))
    }

    fn call_err(store: &RecordStore, req: Value) -> RecordError {
        store.handle(&req).expect_err(&req.to_string())
    }

    fn ids(records: &Value) -> Vec<&str> {
        records
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect()
    }

    fn parse(bytes: &[u8]) -> Value {
        assert_eq!(bytes.last(), Some(&b'\n'));
        serde_json::from_slice(bytes).unwrap()
    }

    fn temp_files(dir: &Path) -> Vec<PathBuf> {
        Collection::ALL
            .into_iter()
            .flat_map(|c| fs::read_dir(dir.join(c.name())).unwrap())
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with(TMP_PREFIX)
            })
            .collect()
    }

    #[test]
    fn serves_fixture_dir_as_is() {
        let (_tmp, store) = served();
        for (collection, id, value) in fixtures() {
            let got = call(
                &store,
                json!({"method": format!("{collection}.get"), "id": id}),
            );
            assert_eq!(got, value, "{collection}/{id}");
        }
    }

    #[test]
    fn every_fixture_round_trips() {
        let (tmp, store) = empty();
        for (collection, id, value) in fixtures() {
            let set = json!({"method": format!("{collection}.set"), "id": id, "value": value});
            assert_eq!(call(&store, set), Value::Null);
            let got = call(
                &store,
                json!({"method": format!("{collection}.get"), "id": id}),
            );
            assert_eq!(got, value, "{collection}/{id}");
            let on_disk = fs::read(tmp.path().join(collection).join(format!("{id}.json")));
            assert_eq!(parse(&on_disk.unwrap()), value);
        }
    }

    #[test]
    fn get_of_missing_id_is_null() {
        let (_tmp, store) = served();
        for collection in Collection::ALL {
            let req = json!({"method": format!("{}.get", collection.name()), "id": "nope"});
            assert_eq!(call(&store, req), Value::Null);
        }
    }

    #[test]
    fn set_inserts_missing_id_and_refuses_a_different_one() {
        let (_tmp, store) = empty();
        let value = json!({"createdAt": 1, "updatedAt": 1, "binding": "local"});
        call(
            &store,
            json!({"method": "sandbox.set", "id": "sbx_1", "value": value}),
        );
        let got = call(&store, json!({"method": "sandbox.get", "id": "sbx_1"}));
        assert_eq!(got["id"], "sbx_1");
        assert_eq!(got["binding"], "local");

        for wrong in [json!("sbx_2"), json!(7)] {
            let req = json!({"method": "sandbox.set", "id": "sbx_1", "value": {"id": wrong}});
            let err = call_err(&store, req);
            assert_eq!(err.http_status(), 400);
            assert!(err.to_string().contains("sbx_1"), "{err}");
        }
        let err = call_err(
            &store,
            json!({"method": "setup.set", "id": "s", "value": [1]}),
        );
        assert!(err.to_string().contains("`value`"), "{err}");
    }

    #[test]
    fn set_validates_required_fields() {
        let (_tmp, store) = empty();
        let cases = [
            ("message", json!({"role": "user"}), "sessionId"),
            ("part", json!({"sessionId": "s", "index": 0}), "messageId"),
            ("part", json!({"sessionId": "s", "messageId": "m"}), "index"),
            (
                "part",
                json!({"sessionId": "s", "messageId": "m", "index": -1}),
                "index",
            ),
            (
                "part",
                json!({"sessionId": "s", "messageId": "m", "index": 1.5}),
                "index",
            ),
            (
                "part",
                json!({"sessionId": 3, "messageId": "m", "index": 0}),
                "sessionId",
            ),
        ];
        for (collection, value, field) in cases {
            let req = json!({"method": format!("{collection}.set"), "id": "x", "value": value});
            let err = call_err(&store, req);
            assert!(matches!(err, RecordError::BadRequest(_)), "{err}");
            assert!(err.to_string().contains(field), "{err}");
        }
        assert_eq!(
            fs::read_dir(store.collection_dir(Collection::Part))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn update_merges_shallowly_and_returns_the_record() {
        let (_tmp, store) = served();
        let updates = json!({"updatedAt": 1763700099000_u64, "generation": {"temperature": 1}});
        let merged = call(
            &store,
            json!({"method": "session.update", "id": "ses_7f3a", "updates": updates}),
        );
        let mut expected = fixture("session", "ses_7f3a");
        expected["updatedAt"] = json!(1763700099000_u64);
        expected["generation"] = json!({"temperature": 1});
        assert_eq!(merged, expected);
        let got = call(&store, json!({"method": "session.get", "id": "ses_7f3a"}));
        assert_eq!(got, expected);

        let merged = call(
            &store,
            json!({"method": "message.update", "id": "msg_0001", "updates": {"x-new": [null]}}),
        );
        assert_eq!(merged["x-new"], json!([null]));
        assert_eq!(merged["role"], "user");

        let merged = call(
            &store,
            json!({"method": "sandbox.update", "id": "sbx_19c", "updates": {"metadata": null}}),
        );
        assert_eq!(merged["metadata"], Value::Null);
        assert_eq!(merged["binding"], "vercel");
    }

    #[test]
    fn update_errors() {
        let (_tmp, store) = served();
        let err = call_err(
            &store,
            json!({"method": "message.update", "id": "msg_9", "updates": {}}),
        );
        assert!(matches!(
            err,
            RecordError::NotFound {
                collection: "message",
                ..
            }
        ));
        assert_eq!(err.http_status(), 404);
        assert_eq!(err.to_string(), "no message record with id \"msg_9\"");

        let err = call_err(
            &store,
            json!({"method": "session.update", "id": "ses_7f3a", "updates": {"id": "other"}}),
        );
        assert_eq!(err.http_status(), 400);
        let err = call_err(
            &store,
            json!({"method": "message.update", "id": "msg_0001", "updates": {"sessionId": 1}}),
        );
        assert!(err.to_string().contains("sessionId"), "{err}");
        let err = call_err(
            &store,
            json!({"method": "session.update", "id": "ses_7f3a"}),
        );
        assert!(err.to_string().contains("`updates`"), "{err}");
        assert_eq!(
            call(&store, json!({"method": "message.get", "id": "msg_0001"})),
            fixture("message", "msg_0001")
        );
    }

    #[test]
    fn message_list_is_in_created_at_then_id_order() {
        let (_tmp, store) = served();
        let list = call(
            &store,
            json!({"method": "message.listBySession", "sessionId": "ses_7f3a"}),
        );
        assert_eq!(ids(&list), ["msg_0001", "msg_0002", "msg_0003", "msg_0004"]);
        assert_eq!(list[2], fixture("message", "msg_0003"));

        // Ties on createdAt fall back to id; another session's messages stay out.
        for (id, session, created) in [
            ("msg_000", "ses_7f3a", 1763700020000_u64),
            ("msg_x", "ses_empty", 0),
        ] {
            let value = json!({"sessionId": session, "role": "user", "createdAt": created});
            call(
                &store,
                json!({"method": "message.set", "id": id, "value": value}),
            );
        }
        let list = call(
            &store,
            json!({"method": "message.listBySession", "sessionId": "ses_7f3a"}),
        );
        assert_eq!(
            ids(&list),
            ["msg_0001", "msg_0002", "msg_000", "msg_0003", "msg_0004"]
        );
        let list = call(
            &store,
            json!({"method": "message.listBySession", "sessionId": "ses_empty"}),
        );
        assert_eq!(ids(&list), ["msg_x"]);
        let list = call(
            &store,
            json!({"method": "message.listBySession", "sessionId": "nobody"}),
        );
        assert_eq!(list, json!([]));
    }

    #[test]
    fn part_list_is_in_message_then_index_order() {
        let (_tmp, store) = served();
        let list = call(
            &store,
            json!({"method": "part.listBySession", "sessionId": "ses_7f3a"}),
        );
        let expected = [
            "prt_0001", "prt_0002", "prt_0003", "prt_0004", "prt_0005", "prt_0007", "prt_0006",
        ];
        assert_eq!(ids(&list), expected);

        // A part of an unknown message goes last; another session's part stays out.
        let orphan = json!({"sessionId": "ses_7f3a", "messageId": "msg_gone", "index": 0});
        call(
            &store,
            json!({"method": "part.set", "id": "prt_0000", "value": orphan}),
        );
        let foreign = json!({"sessionId": "ses_empty", "messageId": "msg_0001", "index": 1});
        call(
            &store,
            json!({"method": "part.set", "id": "prt_f", "value": foreign}),
        );
        let list = call(
            &store,
            json!({"method": "part.listBySession", "sessionId": "ses_7f3a"}),
        );
        assert_eq!(ids(&list)[7..], ["prt_0000"]);
        assert_eq!(list.as_array().unwrap().len(), 8);
        assert_eq!(
            call(&store, json!({"method": "part.get", "id": "prt_f"}))["index"],
            1
        );
    }

    #[test]
    fn unknown_methods_and_bad_params() {
        let (_tmp, store) = served();
        for method in [
            "part.update",
            "setup.update",
            "sandbox.listBySession",
            "session.delete",
            "nope.get",
            "get",
        ] {
            let err = call_err(&store, json!({"method": method, "id": "x"}));
            assert!(
                matches!(&err, RecordError::UnknownMethod(m) if m == method),
                "{err}"
            );
            assert_eq!(err.http_status(), 400);
        }
        let cases = [
            (json!({"id": "x"}), "`method`"),
            (json!({"method": 1}), "`method`"),
            (json!({"method": "session.get"}), "`id`"),
            (json!({"method": "session.get", "id": 5}), "`id`"),
            (json!({"method": "session.set", "id": "x"}), "`value`"),
            (json!({"method": "part.listBySession"}), "`sessionId`"),
        ];
        for (req, param) in cases {
            let err = call_err(&store, req);
            assert!(matches!(err, RecordError::BadRequest(_)), "{err}");
            assert!(err.to_string().contains(param), "{err}");
        }
        assert_eq!(call_err(&store, json!([])).http_status(), 400);
    }

    #[test]
    fn bad_ids_are_refused() {
        let (tmp, store) = empty();
        let long = "a".repeat(201);
        for id in [
            "",
            ".",
            "..",
            ".hidden",
            ".tmp-1",
            "a/b",
            "../session/x",
            "a\0b",
            long.as_str(),
        ] {
            for method in ["session.get", "setup.set"] {
                let err = call_err(&store, json!({"method": method, "id": id, "value": {}}));
                assert!(matches!(err, RecordError::BadRequest(_)), "{err}");
                assert!(err.to_string().contains(&format!("{id:?}")), "{err}");
            }
        }
        let max = "a".repeat(200);
        call(
            &store,
            json!({"method": "setup.set", "id": max, "value": {}}),
        );
        assert!(
            tmp.path()
                .join("setup")
                .join(format!("{max}.json"))
                .exists()
        );
        let err = store.delete_session("..").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn history_nests_parts_in_index_order() {
        let (_tmp, store) = served();
        let view = store.meta_view("ses_7f3a").unwrap().unwrap();
        let history = parse(&view.history);
        assert_eq!(history["session"], fixture("session", "ses_7f3a"));
        let messages = history["messages"].as_array().unwrap();
        assert_eq!(
            ids(&history["messages"]),
            ["msg_0001", "msg_0002", "msg_0003", "msg_0004"]
        );
        let part_ids: Vec<Vec<&str>> = messages.iter().map(|m| ids(&m["parts"])).collect();
        assert_eq!(
            part_ids,
            [
                vec!["prt_0001"],
                vec!["prt_0002", "prt_0003", "prt_0004"],
                vec!["prt_0005"],
                vec!["prt_0007", "prt_0006"],
            ]
        );
        let mut message = messages[1].clone();
        message.as_object_mut().unwrap().remove("parts");
        assert_eq!(message, fixture("message", "msg_0002"));
        assert_eq!(messages[3]["parts"][0], fixture("part", "prt_0007"));
    }

    #[test]
    fn non_ascii_survives() {
        let (tmp, store) = served();
        let tag = "\u{e9}\u{2713}";
        let got = call(&store, json!({"method": "message.get", "id": "msg_0003"}));
        assert_eq!(got["metadata"]["source"]["tags"][1], tag);
        call(
            &store,
            json!({"method": "message.set", "id": "msg_0003", "value": got}),
        );
        let on_disk = fs::read_to_string(tmp.path().join("message/msg_0003.json")).unwrap();
        assert!(on_disk.contains(tag));
        let view = store.meta_view("ses_7f3a").unwrap().unwrap();
        assert!(String::from_utf8(view.history).unwrap().contains(tag));
        assert_eq!(
            parse(&view.messages["msg_0003"]),
            fixture("message", "msg_0003")
        );
        let part = parse(&view.parts["prt_0005"]);
        assert_eq!(part, fixture("part", "prt_0005"));
    }

    #[test]
    fn empty_session_has_empty_history() {
        let (_tmp, store) = served();
        let view = store.meta_view("ses_empty").unwrap().unwrap();
        assert_eq!(parse(&view.session), fixture("session", "ses_empty"));
        assert!(view.messages.is_empty() && view.parts.is_empty());
        let history = parse(&view.history);
        assert_eq!(history["messages"], json!([]));
        assert_eq!(history["session"], fixture("session", "ses_empty"));
    }

    #[test]
    fn meta_view_excludes_other_sessions_records() {
        let (_tmp, store) = served();
        let message = json!({"sessionId": "ses_empty", "role": "user", "createdAt": 1});
        call(
            &store,
            json!({"method": "message.set", "id": "msg_e", "value": message}),
        );
        let part = json!({"sessionId": "ses_empty", "messageId": "msg_0001", "index": 5});
        call(
            &store,
            json!({"method": "part.set", "id": "prt_e", "value": part}),
        );

        let view = store.meta_view("ses_7f3a").unwrap().unwrap();
        assert_eq!(
            view.messages.keys().collect::<Vec<_>>(),
            ["msg_0001", "msg_0002", "msg_0003", "msg_0004"]
        );
        assert_eq!(view.parts.len(), 7);
        assert!(!String::from_utf8(view.history).unwrap().contains("prt_e"));
        let foreign = MetaPath::Message("msg_e".to_owned());
        assert_eq!(store.meta_file("ses_7f3a", &foreign).unwrap(), None);
        assert!(store.meta_file("ses_empty", &foreign).unwrap().is_some());

        // The foreign part's message is not in ses_empty: listed, but not in its history.
        let view = store.meta_view("ses_empty").unwrap().unwrap();
        assert_eq!(view.parts.keys().collect::<Vec<_>>(), ["prt_e"]);
        assert_eq!(parse(&view.history)["messages"][0]["parts"], json!([]));
    }

    #[test]
    fn meta_file_and_list_ids_match_the_view() {
        let (_tmp, store) = served();
        let view = store.meta_view("ses_7f3a").unwrap().unwrap();
        let file = |path: MetaPath| store.meta_file("ses_7f3a", &path).unwrap().unwrap();
        assert_eq!(file(MetaPath::Session), view.session);
        assert_eq!(file(MetaPath::History), view.history);
        for (id, bytes) in &view.messages {
            assert_eq!(&file(MetaPath::Message(id.clone())), bytes);
        }
        for (id, bytes) in &view.parts {
            assert_eq!(&file(MetaPath::Part(id.clone())), bytes);
        }
        let messages = store
            .list_ids(ChildCollection::Message, "ses_7f3a")
            .unwrap()
            .unwrap();
        assert_eq!(messages, view.messages.keys().cloned().collect::<Vec<_>>());
        let parts = store
            .list_ids(ChildCollection::Part, "ses_7f3a")
            .unwrap()
            .unwrap();
        assert_eq!(parts, view.parts.keys().cloned().collect::<Vec<_>>());

        for missing in [
            MetaPath::Message("msg_9".into()),
            MetaPath::Part("../part/prt_0001".into()),
        ] {
            assert_eq!(store.meta_file("ses_7f3a", &missing).unwrap(), None);
        }
        for session in ["ses_gone", "../session/ses_7f3a", ""] {
            assert!(store.meta_view(session).unwrap().is_none());
            assert_eq!(store.meta_file(session, &MetaPath::Session).unwrap(), None);
            assert_eq!(
                store.list_ids(ChildCollection::Part, session).unwrap(),
                None
            );
        }
        assert_eq!(
            store
                .list_ids(ChildCollection::Message, "ses_empty")
                .unwrap(),
            Some(vec![])
        );
    }

    #[test]
    fn version_changes_on_writes_touching_the_session() {
        let (_tmp, store) = served();
        assert_eq!(store.version("ses_7f3a"), 0);
        let mut seen = vec![0];
        let mut record = |store: &RecordStore| {
            let now = store.version("ses_7f3a");
            assert!(!seen.contains(&now), "{now} in {seen:?}");
            seen.push(now);
        };
        call(
            &store,
            json!({"method": "session.update", "id": "ses_7f3a", "updates": {"x": 1}}),
        );
        record(&store);
        let part = fixture("part", "prt_0001");
        call(
            &store,
            json!({"method": "part.set", "id": "prt_0001", "value": part}),
        );
        record(&store);
        // Moving a message to another session touches both.
        let updates = json!({"sessionId": "ses_empty"});
        call(
            &store,
            json!({"method": "message.update", "id": "msg_0001", "updates": updates}),
        );
        record(&store);
        assert_ne!(store.version("ses_empty"), 0);

        let unchanged = store.version("ses_7f3a");
        call(
            &store,
            json!({"method": "sandbox.update", "id": "sbx_19c", "updates": {"x": 1}}),
        );
        call(
            &store,
            json!({"method": "setup.set", "id": "setup_v4", "value": {}}),
        );
        call(&store, json!({"method": "session.get", "id": "ses_7f3a"}));
        assert_eq!(store.version("ses_7f3a"), unchanged);
        store.delete_session("ses_7f3a").unwrap();
        record(&store);
    }

    #[test]
    fn writes_leave_no_temp_files_and_stale_ones_are_ignored_then_removed() {
        let (tmp, store) = served();
        for (collection, id, value) in fixtures() {
            call(
                &store,
                json!({"method": format!("{collection}.set"), "id": id, "value": value}),
            );
        }
        call(
            &store,
            json!({"method": "session.update", "id": "ses_7f3a", "updates": {}}),
        );
        assert_eq!(temp_files(tmp.path()), Vec::<PathBuf>::new());

        let stale = tmp.path().join("message").join(".tmp-1-0");
        fs::write(&stale, r#"{"id":"x","sessionId":"ses_7f3a","createdAt":0}"#).unwrap();
        let list = call(
            &store,
            json!({"method": "message.listBySession", "sessionId": "ses_7f3a"}),
        );
        assert_eq!(list.as_array().unwrap().len(), 4);
        assert_eq!(
            store
                .list_ids(ChildCollection::Message, "ses_7f3a")
                .unwrap()
                .unwrap()
                .len(),
            4
        );

        drop(store);
        RecordStore::open(tmp.path()).unwrap();
        assert!(!stale.exists());
    }

    #[test]
    fn unparsable_files_are_skipped_by_listings_but_fail_get() {
        let (tmp, store) = served();
        fs::write(tmp.path().join("part/prt_bad.json"), "{not json").unwrap();
        let list = call(
            &store,
            json!({"method": "part.listBySession", "sessionId": "ses_7f3a"}),
        );
        assert_eq!(list.as_array().unwrap().len(), 7);
        let err = call_err(&store, json!({"method": "part.get", "id": "prt_bad"}));
        assert_eq!(err.http_status(), 500);
        assert!(err.to_string().contains("prt_bad.json"), "{err}");
        // Overwriting it is allowed.
        let part = json!({"sessionId": "ses_7f3a", "messageId": "msg_0001", "index": 1});
        call(
            &store,
            json!({"method": "part.set", "id": "prt_bad", "value": part}),
        );
        assert_eq!(
            call(&store, json!({"method": "part.get", "id": "prt_bad"}))["index"],
            1
        );
    }

    #[test]
    fn delete_session_removes_session_messages_and_parts() {
        let (tmp, store) = served();
        assert_eq!(store.delete_session("ses_7f3a").unwrap(), 1 + 4 + 7);
        for (collection, id) in [
            ("session", "ses_7f3a"),
            ("message", "msg_0003"),
            ("part", "prt_0007"),
        ] {
            let got = call(
                &store,
                json!({"method": format!("{collection}.get"), "id": id}),
            );
            assert_eq!(got, Value::Null);
        }
        assert!(store.meta_view("ses_7f3a").unwrap().is_none());
        for (collection, id) in [
            ("session", "ses_empty"),
            ("sandbox", "sbx_19c"),
            ("setup", "setup_v3"),
        ] {
            let got = call(
                &store,
                json!({"method": format!("{collection}.get"), "id": id}),
            );
            assert_eq!(got, fixture(collection, id));
        }
        assert_eq!(fs::read_dir(tmp.path().join("part")).unwrap().count(), 0);
        assert_eq!(store.delete_session("ses_7f3a").unwrap(), 0);
        assert_eq!(store.delete_session("ses_empty").unwrap(), 1);
    }

    #[test]
    fn concurrent_updates_are_not_lost() {
        let (_tmp, store) = served();
        let store = Arc::new(store);
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for j in 0..5 {
                        let updates = json!({ format!("k{i}_{j}"): j });
                        call(&store, json!({"method": "session.update", "id": "ses_7f3a", "updates": updates}));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let session = call(&store, json!({"method": "session.get", "id": "ses_7f3a"}));
        assert_eq!(session.as_object().unwrap().len(), 8 + 8 * 5);
    }

    #[test]
    fn errors_display_one_sentence_and_map_to_http_status() {
        let io = RecordError::from(io::Error::other("disk on fire"));
        assert_eq!(io.http_status(), 500);
        assert_eq!(io.to_string(), "record storage failed: disk on fire");
        assert!(std::error::Error::source(&io).is_some());
        assert_eq!(
            RecordError::UnknownMethod("x.y".into()).to_string(),
            "unknown method \"x.y\""
        );
        assert_eq!(
            bad("missing param `id`").to_string(),
            "bad request: missing param `id`"
        );
    }
}
