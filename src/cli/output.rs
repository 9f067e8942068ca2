//! What the CLI prints for people, made from the API's answers (`--json` prints those as
//! they are instead).

use std::time::Duration;

use serde_json::Value;

use crate::control::{EndReport, MountInfo, SessionInfo, Status};
use crate::human::{self, Align, Table, of};

/// `roomfs status`.
pub fn status(s: &Status) -> String {
    human::fields(&[
        ("version", s.version.clone()),
        ("data dir", s.data_dir.clone()),
        ("socket", s.socket.clone()),
        ("mounts", s.mounts.to_string()),
        ("sessions", s.sessions.to_string()),
        (
            "uptime",
            human::duration(Duration::from_secs(s.uptime_secs)),
        ),
    ])
}

/// `roomfs mounts`.
pub fn mounts(mounts: &Vec<MountInfo>) -> String {
    if mounts.is_empty() {
        return "no mounts\n".into();
    }
    let mut t = Table::new(&[
        ("MOUNT POINT", Align::Left),
        ("SPACE", Align::Left),
        ("GRANT", Align::Left),
        ("FROM", Align::Left),
    ]);
    for m in mounts {
        t.row(vec![
            m.mountpoint.clone(),
            format!("{} {}", m.kind, m.id),
            m.access(),
            if m.from_config { "config" } else { "api" }.into(),
        ]);
    }
    t.render()
}

/// When an idle session ends: `after 2h idle`, or `never`.
fn ttl(ttl_secs: Option<u64>) -> String {
    match ttl_secs {
        Some(secs) => format!("after {} idle", human::duration(Duration::from_secs(secs))),
        None => "never".into(),
    }
}

/// `roomfs session list`.
pub fn sessions(sessions: &Vec<SessionInfo>, now: u64) -> String {
    if sessions.is_empty() {
        return "no sessions\n".into();
    }
    let mut t = Table::new(&[
        ("ID", Align::Left),
        ("FILES", Align::Right),
        ("SIZE", Align::Right),
        ("MAX FILE", Align::Right),
        ("ENDS", Align::Left),
        ("LAST ACTIVE", Align::Left),
        ("MOUNTED AT", Align::Left),
    ]);
    for s in sessions {
        t.row(vec![
            s.id.clone(),
            of(
                s.files.to_string(),
                s.limits.max_files.map(|n| n.to_string()),
            ),
            of(human::size(s.bytes), s.limits.max_bytes.map(human::size)),
            s.limits.max_file_bytes.map_or("-".into(), human::size),
            ttl(s.ttl_secs),
            human::relative(s.last_active, now),
            s.mounts.join(", "),
        ]);
    }
    t.render()
}

/// `roomfs session show`.
pub fn session(s: &SessionInfo, now: u64) -> String {
    let ends = match s.ends_at {
        Some(at) => format!("{} ({})", ttl(s.ttl_secs), human::relative(at, now)),
        None => ttl(s.ttl_secs),
    };
    human::fields(&[
        ("session", s.id.clone()),
        (
            "created",
            format!(
                "{} ({})",
                human::local_time(s.created_at),
                human::relative(s.created_at, now)
            ),
        ),
        ("last active", human::relative(s.last_active, now)),
        ("ends", ends),
        (
            "files",
            of(
                s.files.to_string(),
                s.limits.max_files.map(|n| n.to_string()),
            ),
        ),
        (
            "size",
            of(human::size(s.bytes), s.limits.max_bytes.map(human::size)),
        ),
        (
            "max file",
            s.limits
                .max_file_bytes
                .map_or("no limit".into(), human::size),
        ),
        (
            "mounted at",
            if s.mounts.is_empty() {
                "-".into()
            } else {
                s.mounts.join(", ")
            },
        ),
    ])
}

/// `roomfs session create`.
pub fn session_created(s: &SessionInfo) -> String {
    let limits = [
        s.limits.max_files.map(|n| format!("{n} files")),
        s.limits
            .max_bytes
            .map(|n| format!("{} in all", human::size(n))),
        s.limits
            .max_file_bytes
            .map(|n| format!("{} a file", human::size(n))),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>();
    let limits = if limits.is_empty() {
        "no limits".to_string()
    } else {
        format!("up to {}", limits.join(", "))
    };
    let ends = match s.ttl_secs {
        Some(_) => format!("ends {}", ttl(s.ttl_secs)),
        None => "no idle timeout".into(),
    };
    format!("created session {}: {limits}; {ends}\n", s.id)
}

/// `roomfs session end`.
pub fn session_ended(r: &EndReport) -> String {
    let mut out = format!(
        "ended session {}: deleted {} entries and {} records",
        r.id, r.deleted_files, r.deleted_records
    );
    if !r.exported.is_empty() {
        out.push_str(&format!("; exported {}", r.exported.join(", ")));
    }
    if !r.unmounted.is_empty() {
        out.push_str(&format!("; unmounted {}", r.unmounted.join(", ")));
    }
    out.push('\n');
    out
}

/// A field of a record as text (`-` if absent).
fn field(record: &Value, name: &str) -> String {
    match record.get(name) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// A record's `createdAt` (Unix ms) as local time.
fn created(record: &Value) -> String {
    match record.get("createdAt").and_then(Value::as_u64) {
        Some(ms) => human::local_time(ms),
        None => "-".into(),
    }
}

/// `roomfs records list`: messages or parts of a session, in the API's order.
pub fn records(collection: &str, records: &Value) -> String {
    let Some(list) = records.as_array() else {
        return format!("{records:#}\n");
    };
    if list.is_empty() {
        return format!("no {collection} records for this session\n");
    }
    let mut t = if collection == "part" {
        Table::new(&[
            ("ID", Align::Left),
            ("MESSAGE", Align::Left),
            ("INDEX", Align::Right),
            ("TYPE", Align::Left),
            ("CONTENT", Align::Left),
        ])
    } else {
        Table::new(&[
            ("ID", Align::Left),
            ("ROLE", Align::Left),
            ("CREATED", Align::Left),
        ])
    };
    for r in list {
        if collection == "part" {
            // Text parts show their text; tool parts their state.
            let content = match r.get("text").and_then(Value::as_str) {
                Some(text) => human::one_line(text, 60),
                None => field(r, "state"),
            };
            t.row(vec![
                field(r, "id"),
                field(r, "messageId"),
                field(r, "index"),
                field(r, "type"),
                content,
            ]);
        } else {
            t.row(vec![field(r, "id"), field(r, "role"), created(r)]);
        }
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::Limits;
    use serde_json::json;

    fn info(id: &str) -> SessionInfo {
        SessionInfo {
            id: id.into(),
            limits: Limits {
                max_file_bytes: Some(10_000_000),
                max_files: Some(100),
                max_bytes: Some(50_000_000),
            },
            ttl_secs: Some(7200),
            created_at: 1_000_000,
            last_active: 1_000_000,
            ends_at: Some(1_000_000 + 7_200_000),
            files: 4,
            bytes: 2048,
            mounts: vec!["/tmp/x".into()],
        }
    }

    #[test]
    fn session_tables_are_aligned_and_readable() {
        let mut other = info("a-longer-session");
        other.limits = Limits::default();
        other.ttl_secs = None;
        other.files = 1234;
        other.bytes = 5 << 30;
        other.mounts = vec![];
        let now = 1_000_000 + 12_000;
        assert_eq!(
            sessions(&vec![info("s1"), other], now),
            "\
ID                  FILES                SIZE  MAX FILE  ENDS           LAST ACTIVE  MOUNTED AT
s1                4 / 100  2.0 KiB / 47.7 MiB   9.5 MiB  after 2h idle  12s ago      /tmp/x
a-longer-session     1234             5.0 GiB         -  never          12s ago
"
        );
        let shown = session(&info("s1"), 1_000_000 + 3_600_000);
        assert!(
            shown.starts_with("session      s1\ncreated      "),
            "{shown}"
        );
        assert!(
            shown.contains("\nends         after 2h idle (in 1h)\n"),
            "{shown}"
        );
        assert!(
            shown.contains("\nsize         2.0 KiB / 47.7 MiB\n"),
            "{shown}"
        );
        assert!(shown.contains("\nlast active  1h ago\n"), "{shown}");
    }

    #[test]
    fn records_show_one_line_each() {
        let parts = json!([
            {"id": "p1", "messageId": "m1", "index": 0, "type": "text", "text": "Hello\nworld"},
            {"id": "p2", "messageId": "m1", "index": 1, "type": "tool-x", "state": "done"},
        ]);
        assert_eq!(
            records("part", &parts),
            "\
ID  MESSAGE  INDEX  TYPE    CONTENT
p1  m1           0  text    Hello…
p2  m1           1  tool-x  done
"
        );
        assert_eq!(
            records("message", &json!([])),
            "no message records for this session\n"
        );
    }

    #[test]
    fn end_and_create_say_what_happened() {
        let r = EndReport {
            id: "s1".into(),
            deleted_files: 4,
            deleted_records: 2,
            exported: vec!["team/outputs".into()],
            unmounted: vec![],
        };
        assert_eq!(
            session_ended(&r),
            "ended session s1: deleted 4 entries and 2 records; exported team/outputs\n"
        );
        assert_eq!(
            session_created(&info("s1")),
            "created session s1: up to 100 files, 47.7 MiB in all, 9.5 MiB a file; ends \
             after 2h idle\n"
        );
        let mut open_ended = info("s2");
        open_ended.ttl_secs = None;
        open_ended.limits = Limits::default();
        assert_eq!(
            session_created(&open_ended),
            "created session s2: no limits; no idle timeout\n"
        );
    }
}
