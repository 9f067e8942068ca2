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
//! On disk, nothing below the records dir is followed or trusted ([`dir`]): a symlink, FIFO,
//! socket, device or directory where a record should be is never read. A bad entry found while
//! listing (`listBySession`, `.meta`) is skipped with a warning, so it cannot hide the rest; a
//! `get` of it, and any use of a collection directory that is not a directory, is an error
//! naming it.
//!
//! Sessions, messages and parts are indexed by session in memory ([`index`]), kept fresh
//! through the store's own writes and by watching the directory for other writers; rendered
//! `.meta` files are cached until the records they show change.

mod dir;
mod index;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value, json};

use dir::{CollectionDir, RecordsDir};
use index::{Index, Loaded};

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

/// What went wrong with a record request. The kinds are the record model's; the control API
/// decides what each means in HTTP.
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

pub struct RecordStore {
    dir: RecordsDir,
    /// Held by every mutation, so read-modify-write and version bumps are atomic. Reads don't
    /// take it: each record file is replaced by an atomic rename.
    write_lock: Mutex<()>,
    index: Mutex<Index>,
    tmp_seq: AtomicU64,
}

impl RecordStore {
    /// Opens (creating missing directories) the store at `dir` and removes temporary files
    /// left by interrupted writes. `dir` may be a symlink (the operator's choice); nothing
    /// below it is followed: a collection directory that is a symlink or not a directory is an
    /// error naming it.
    pub fn open(dir: &Path) -> io::Result<RecordStore> {
        RecordStore::open_with(dir, true)
    }

    /// [`RecordStore::open`], noticing other writers without inotify if `watch` is false.
    fn open_with(dir: &Path, watch: bool) -> io::Result<RecordStore> {
        let dir = RecordsDir::open(dir)?;
        for collection in Collection::ALL {
            dir.create_collection(collection.name())?;
            remove_temp_files(&dir.collection(collection.name())?)?;
        }
        Ok(RecordStore {
            dir,
            write_lock: Mutex::new(()),
            index: Mutex::new(Index::new(watch)),
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
                let mut index = self.fresh_index()?;
                let (messages, parts) = index.children_in_order(session_id)?;
                let records = if collection == Collection::Message {
                    messages
                } else {
                    parts
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
        let children = {
            let index = self.fresh_index()?;
            [ChildCollection::Message, ChildCollection::Part]
                .map(|c| (c.collection(), index.child_ids(c, session_id)))
        };
        let mut removed = 0;
        // Children first: an interrupted deletion leaves the session record to retry with.
        for (collection, ids) in children
            .into_iter()
            .chain([(Collection::Session, vec![session_id.to_owned()])])
        {
            let dir = self.dir.collection(collection.name())?;
            for id in ids {
                removed += usize::from(dir.remove(&file_name(&id))?);
                lock(&self.index).written(collection, &id, None);
            }
            dir.sync()?;
        }
        lock(&self.index).bump(&[session_id]);
        Ok(removed)
    }

    /// The whole `.meta` view of a session, or `None` if its session record doesn't exist.
    pub fn meta_view(&self, session_id: &str) -> io::Result<Option<MetaView>> {
        let mut index = self.fresh_index()?;
        if !valid_session(session_id) || !index.session_exists(session_id) {
            return Ok(None);
        }
        let Some(session) = index.rendered(Collection::Session, session_id)? else {
            return Ok(None);
        };
        let Some(history) = index.history(session_id)? else {
            return Ok(None);
        };
        let mut files = |collection: ChildCollection| -> io::Result<_> {
            let mut out = BTreeMap::new();
            for id in index.child_ids(collection, session_id) {
                if let Some(bytes) = index.rendered(collection.collection(), &id)? {
                    out.insert(id, bytes.to_vec());
                }
            }
            Ok(out)
        };
        let messages = files(ChildCollection::Message)?;
        let parts = files(ChildCollection::Part)?;
        Ok(Some(MetaView {
            session: session.to_vec(),
            messages,
            parts,
            history: history.to_vec(),
        }))
    }

    /// One file of [`RecordStore::meta_view`]. `None` if the session or the record doesn't
    /// exist, or the record belongs to another session.
    pub fn meta_file(&self, session_id: &str, path: &MetaPath) -> io::Result<Option<Vec<u8>>> {
        Ok(self.meta_bytes(session_id, path)?.map(|b| b.to_vec()))
    }

    /// [`RecordStore::meta_file`] without a copy: the rendering is cached (until the records it
    /// shows change) and shared.
    pub fn meta_bytes(&self, session_id: &str, path: &MetaPath) -> io::Result<Option<Arc<[u8]>>> {
        let mut index = self.fresh_index()?;
        if !valid_session(session_id) || !index.session_exists(session_id) {
            return Ok(None);
        }
        let (collection, id) = match path {
            MetaPath::Session => return index.rendered(Collection::Session, session_id),
            MetaPath::History => return index.history(session_id),
            MetaPath::Message(id) => (ChildCollection::Message, id),
            MetaPath::Part(id) => (ChildCollection::Part, id),
        };
        if index.session_of(collection, id) != Some(session_id) {
            return Ok(None);
        }
        index.rendered(collection.collection(), id)
    }

    /// Ids (sorted) of the session's messages or parts, as keyed in [`MetaView`]; `None` if the
    /// session record doesn't exist.
    pub fn list_ids(
        &self,
        collection: ChildCollection,
        session_id: &str,
    ) -> io::Result<Option<Vec<String>>> {
        let index = self.fresh_index()?;
        if !valid_session(session_id) || !index.session_exists(session_id) {
            return Ok(None);
        }
        Ok(Some(index.child_ids(collection, session_id)))
    }

    /// Changes after every change that touches the session (its record, or a message or part
    /// that belongs or belonged to it): writes through this store, and changes by other
    /// processes as far as they are noticed (see [`index`]); 0 if none happened since `open`.
    pub fn version(&self, session_id: &str) -> u64 {
        let mut index = lock(&self.index);
        if let Err(err) = index.refresh(&self.dir) {
            log::warn!("records: {err}");
        }
        index.version(session_id)
    }

    /// Whether changes by other processes are noticed through inotify (see [`index`]).
    pub fn watching(&self) -> io::Result<bool> {
        Ok(self.fresh_index()?.watching())
    }

    /// The index, brought up to date with the disk.
    fn fresh_index(&self) -> io::Result<MutexGuard<'_, Index>> {
        let mut index = lock(&self.index);
        index.refresh(&self.dir)?;
        Ok(index)
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
        self.write(collection, id, value, old.as_ref())?;
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
        self.write(collection, id, merged.clone(), Some(&old))?;
        Ok(merged)
    }

    /// Reads one record; `id` must already be checked.
    fn read(&self, collection: Collection, id: &str) -> io::Result<Option<Value>> {
        let dir = self.dir.collection(collection.name())?;
        let name = file_name(id);
        match dir.read(&name)? {
            Some((bytes, _)) => parse_record(&bytes, &dir.path().join(&name)).map(Some),
            None => Ok(None),
        }
    }

    /// Replaces a record atomically (temp file in the same directory, fsync, rename, fsync
    /// dir), and records the change in the index and the versions of the sessions a write of
    /// `value` over `old` touches.
    fn write(
        &self,
        collection: Collection,
        id: &str,
        value: Value,
        old: Option<&Value>,
    ) -> io::Result<()> {
        let dir = self.dir.collection(collection.name())?;
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = format!("{TMP_PREFIX}{}-{seq}", std::process::id());
        let bytes = render(&value);
        let result = dir
            .create(&tmp, &bytes)
            .and_then(|()| dir.rename(&tmp, &file_name(id)))
            .and_then(|()| dir.sync());
        if result.is_err() {
            // Best effort: after a successful rename the temp file is already gone.
            let _ = dir.remove(&tmp);
        }
        result?;
        let touched: Vec<String> = match collection {
            Collection::Session => vec![id.to_owned()],
            Collection::Message | Collection::Part => {
                [old.and_then(session_id_of), session_id_of(&value)]
                    .into_iter()
                    .flatten()
                    .map(str::to_owned)
                    .collect()
            }
            Collection::Sandbox | Collection::Setup => Vec::new(),
        };
        let mut index = lock(&self.index);
        index.written(collection, id, Some(Loaded::written(bytes, value)));
        if !touched.is_empty() {
            index.bump(&touched.iter().map(String::as_str).collect::<Vec<_>>());
        }
        Ok(())
    }
}

/// Whether `session_id` can name a session record at all.
fn valid_session(session_id: &str) -> bool {
    check_id(session_id).is_ok()
}

fn file_name(id: &str) -> String {
    format!("{id}.json")
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

/// Removes the temporary files interrupted writes left in `dir`; a directory with their
/// prefix is left alone with a warning.
fn remove_temp_files(dir: &CollectionDir) -> io::Result<()> {
    for entry in dir.list()? {
        if !entry.name.starts_with(TMP_PREFIX) {
            continue;
        }
        let path = dir.path().join(&entry.name);
        match dir.remove(&entry.name) {
            Ok(_) => log::info!("removed leftover temp file {}", path.display()),
            Err(err) if err.kind() == io::ErrorKind::IsADirectory => {
                log::warn!("leaving {}: a directory, not a temp file", path.display());
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
