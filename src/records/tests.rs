use super::*;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
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
        assert!(matches!(err, RecordError::BadRequest(_)), "{err}");
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
        fs::read_dir(store.dir.path().join("part")).unwrap().count(),
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
    assert_eq!(err.to_string(), "no message record with id \"msg_9\"");

    let err = call_err(
        &store,
        json!({"method": "session.update", "id": "ses_7f3a", "updates": {"id": "other"}}),
    );
    assert!(matches!(err, RecordError::BadRequest(_)), "{err}");
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
    let err = call_err(&store, json!([]));
    assert!(matches!(err, RecordError::BadRequest(_)), "{err}");
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

    // A directory with the prefix is not removed, nor does it stop the store from opening.
    fs::create_dir(tmp.path().join("part/.tmp-dir")).unwrap();
    drop(store);
    RecordStore::open(tmp.path()).unwrap();
    assert!(!stale.exists());
    assert!(tmp.path().join("part/.tmp-dir").is_dir());
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
    assert!(matches!(err, RecordError::Io(_)), "{err}");
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
                    call(
                        &store,
                        json!({"method": "session.update", "id": "ses_7f3a", "updates": updates}),
                    );
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
fn errors_display_one_sentence() {
    let io = RecordError::from(io::Error::other("disk on fire"));
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

// ---- what other processes do to the records dir ----------------------------------------------

impl RecordStore {
    fn files_read(&self) -> u64 {
        lock(&self.index).reads()
    }
}

/// A copy of the fixture directory served as is, noticing other writers with inotify
/// (`watch`) or through directory attributes only.
fn served_with(watch: bool) -> (TempDir, RecordStore) {
    let (tmp, store) = served();
    drop(store);
    let store = RecordStore::open_with(tmp.path(), watch).unwrap();
    assert_eq!(store.watching().unwrap(), watch);
    (tmp, store)
}

fn part_ids(store: &RecordStore, session: &str) -> Option<Vec<String>> {
    store.list_ids(ChildCollection::Part, session).unwrap()
}

fn message_ids(store: &RecordStore, session: &str) -> Option<Vec<String>> {
    store.list_ids(ChildCollection::Message, session).unwrap()
}

fn meta(store: &RecordStore, session: &str, path: MetaPath) -> Option<Value> {
    store
        .meta_file(session, &path)
        .unwrap()
        .map(|bytes| parse(&bytes))
}

/// Writes `value` as a new file renamed over `path`, as careful writers do.
fn write_by_rename(path: &Path, value: &Value) {
    let tmp = path.with_extension("tmp~");
    fs::write(&tmp, serde_json::to_vec(value).unwrap()).unwrap();
    fs::rename(&tmp, path).unwrap();
}

#[test]
fn changes_by_other_processes_show_at_the_next_look() {
    for watch in [true, false] {
        let (tmp, store) = served_with(watch);
        let dir = tmp.path();
        let history = |store: &RecordStore| meta(store, "ses_7f3a", MetaPath::History).unwrap();
        assert_eq!(history(&store)["messages"].as_array().unwrap().len(), 4);
        let version = store.version("ses_7f3a");

        // A new message, written by rename.
        let message = json!({"id": "msg_0005", "sessionId": "ses_7f3a", "role": "user", "createdAt": 1763700099000u64});
        write_by_rename(&dir.join("message/msg_0005.json"), &message);
        assert_eq!(
            message_ids(&store, "ses_7f3a").unwrap().len(),
            5,
            "watch {watch}"
        );
        let mut shown = message.clone();
        shown["parts"] = json!([]);
        assert_eq!(history(&store)["messages"][4], shown);
        assert_ne!(store.version("ses_7f3a"), version);

        // A part rewritten in place (no rename), moving it to another message: the history's
        // order follows.
        let mut part = fixture("part", "prt_0001");
        part["messageId"] = json!("msg_0005");
        fs::write(dir.join("part/prt_0001.json"), part.to_string()).unwrap();
        assert_eq!(
            meta(&store, "ses_7f3a", MetaPath::Part("prt_0001".into())).unwrap(),
            part,
            "watch {watch}"
        );
        assert_eq!(history(&store)["messages"][4]["parts"][0], part);

        // A part removed; a message moved to another session.
        fs::remove_file(dir.join("part/prt_0002.json")).unwrap();
        let mut moved = fixture("message", "msg_0004");
        moved["sessionId"] = json!("ses_empty");
        write_by_rename(&dir.join("message/msg_0004.json"), &moved);
        assert!(
            !part_ids(&store, "ses_7f3a")
                .unwrap()
                .contains(&"prt_0002".to_owned())
        );
        assert_eq!(message_ids(&store, "ses_empty").unwrap(), ["msg_0004"]);
        assert!(meta(&store, "ses_7f3a", MetaPath::Message("msg_0004".into())).is_none());

        // The session record replaced, then removed.
        let mut session = fixture("session", "ses_7f3a");
        session["model"] = json!("other/model");
        write_by_rename(&dir.join("session/ses_7f3a.json"), &session);
        assert_eq!(
            meta(&store, "ses_7f3a", MetaPath::Session).unwrap(),
            session
        );
        fs::remove_file(dir.join("session/ses_7f3a.json")).unwrap();
        assert!(store.meta_view("ses_7f3a").unwrap().is_none());
        assert_eq!(part_ids(&store, "ses_7f3a"), None);
    }
}

#[test]
fn without_inotify_a_record_rewritten_in_place_shows_once_its_directory_changes() {
    let (tmp, store) = served_with(false);
    // Older than the one-second window in which equal timestamps can hide a change.
    std::thread::sleep(Duration::from_millis(1100));
    let before = meta(&store, "ses_7f3a", MetaPath::Message("msg_0001".into())).unwrap();
    let mut changed = before.clone();
    changed["role"] = json!("system");
    fs::write(
        tmp.path().join("message/msg_0001.json"),
        changed.to_string(),
    )
    .unwrap();
    // The documented limit: nothing in the directory changed, so nothing is read again.
    assert_eq!(
        meta(&store, "ses_7f3a", MetaPath::Message("msg_0001".into())).unwrap(),
        before
    );
    fs::remove_file(tmp.path().join("message/msg_0002.json")).unwrap();
    assert_eq!(
        meta(&store, "ses_7f3a", MetaPath::Message("msg_0001".into())).unwrap(),
        changed
    );
    // With inotify the in-place rewrite shows at once.
    let (tmp, store) = served_with(true);
    assert_eq!(
        meta(&store, "ses_7f3a", MetaPath::Message("msg_0001".into())).unwrap(),
        before
    );
    fs::write(
        tmp.path().join("message/msg_0001.json"),
        changed.to_string(),
    )
    .unwrap();
    assert_eq!(
        meta(&store, "ses_7f3a", MetaPath::Message("msg_0001".into())).unwrap(),
        changed
    );
}

#[test]
fn looking_again_at_an_unchanged_view_reads_no_file() {
    for watch in [true, false] {
        let (tmp, store) = served_with(watch);
        if !watch {
            // Without inotify, directories changed within the last second are scanned again.
            std::thread::sleep(Duration::from_millis(1100));
        }
        let first = store
            .meta_bytes("ses_7f3a", &MetaPath::History)
            .unwrap()
            .unwrap();
        store.meta_view("ses_7f3a").unwrap().unwrap();
        let read = store.files_read();
        assert!(read >= 15, "{read}");
        for _ in 0..3 {
            let again = store
                .meta_bytes("ses_7f3a", &MetaPath::History)
                .unwrap()
                .unwrap();
            assert!(Arc::ptr_eq(&first, &again), "watch {watch}: rendered again");
            store.meta_view("ses_7f3a").unwrap().unwrap();
            part_ids(&store, "ses_7f3a").unwrap();
            call(
                &store,
                json!({"method": "part.listBySession", "sessionId": "ses_7f3a"}),
            );
        }
        assert_eq!(store.files_read(), read, "watch {watch}");

        // One record changed by another process: with inotify exactly that one is read again.
        let mut part = fixture("part", "prt_0003");
        part["state"] = json!("output-error");
        write_by_rename(&tmp.path().join("part/prt_0003.json"), &part);
        let again = store
            .meta_bytes("ses_7f3a", &MetaPath::History)
            .unwrap()
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &again));
        assert_eq!(parse(&again)["messages"][1]["parts"][1], part);
        if watch {
            assert_eq!(store.files_read(), read + 1);
        }

        // A write through the store changes the view too, and is not read back.
        let read = store.files_read();
        let updates = json!({"role": "system"});
        call(
            &store,
            json!({"method": "message.update", "id": "msg_0001", "updates": updates}),
        );
        assert_eq!(
            meta(&store, "ses_7f3a", MetaPath::History).unwrap()["messages"][0]["role"],
            "system"
        );
        if watch {
            // The write's own event re-reads the file once, finding it unchanged.
            assert!(
                store.files_read() <= read + 2,
                "{}",
                store.files_read() - read
            );
        }
    }
}

#[test]
fn a_collection_directory_replaced_by_another_is_scanned_again() {
    for watch in [true, false] {
        let (tmp, store) = served_with(watch);
        assert_eq!(part_ids(&store, "ses_7f3a").unwrap().len(), 7);
        let dir = tmp.path();
        fs::rename(dir.join("part"), dir.join("part.old")).unwrap();
        fs::create_dir(dir.join("part")).unwrap();
        fs::copy(
            dir.join("part.old/prt_0005.json"),
            dir.join("part/prt_0005.json"),
        )
        .unwrap();
        assert_eq!(
            part_ids(&store, "ses_7f3a").unwrap(),
            ["prt_0005"],
            "watch {watch}"
        );
        let history = meta(&store, "ses_7f3a", MetaPath::History).unwrap();
        assert_eq!(history["messages"][2]["parts"][0]["id"], "prt_0005");
        assert_eq!(history["messages"][1]["parts"], json!([]));
    }
}

// ---- attacks: nothing below the records dir is followed ---------------------------------------

/// Contents and times of every file under `dir`, to show that nothing there changed (and, where
/// the filesystem updates access times on read, that nothing was read).
fn snapshot(dir: &Path) -> Snapshot {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            out.extend(snapshot(&path));
        } else {
            let bytes = if meta.is_file() {
                // Read through a copy of the times: our own read must not count.
                let bytes = fs::read(&path).unwrap();
                set_times(&path, meta.atime(), meta.mtime());
                bytes
            } else {
                Vec::new()
            };
            out.push((path, bytes, meta.atime(), meta.mtime()));
        }
    }
    out.sort();
    out
}

type Snapshot = Vec<(PathBuf, Vec<u8>, i64, i64)>;

/// Fails naming the paths that differ (with times only where reads show in access times).
fn assert_unchanged(before: &Snapshot, after: &Snapshot, with_atime: bool) {
    let key = |s: &Snapshot| -> Vec<(PathBuf, Vec<u8>, i64, i64)> {
        s.iter()
            .map(|(p, b, a, m)| (p.clone(), b.clone(), if with_atime { *a } else { 0 }, *m))
            .collect()
    };
    if key(before) != key(after) {
        let names = |s: &Snapshot| {
            s.iter()
                .map(|e| e.0.display().to_string())
                .collect::<Vec<_>>()
        };
        panic!(
            "outside the records dir changed (or was read): before {:?}, after {:?}",
            names(before),
            names(after)
        );
    }
}

fn set_times(path: &Path, atime: i64, mtime: i64) {
    let times = [
        libc::timespec {
            tv_sec: atime,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        },
    ];
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and two timespecs.
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) },
        0
    );
}

/// A directory outside the records dir holding `files`, each with an access time older than
/// its modification time, so that (on `relatime` and `strictatime` filesystems) any read moves it.
fn outside(files: &[(&str, Value)]) -> TempDir {
    let dir = TempDir::new().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (name, value) in files {
        let path = dir.path().join(name);
        fs::write(&path, value.to_string()).unwrap();
        set_times(&path, now - 2000, now - 1000);
    }
    dir
}

/// Whether reading a file moves its access time here (not on `noatime` mounts).
fn reads_show_in_atime(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let probe = dir.join("probe");
    fs::write(&probe, b"x").unwrap();
    let mtime = fs::metadata(&probe).unwrap().mtime();
    set_times(&probe, mtime - 1000, mtime);
    fs::read(&probe).unwrap();
    let moved = fs::metadata(&probe).unwrap().atime() != mtime - 1000;
    fs::remove_file(probe).unwrap();
    moved
}

fn symlink(target: &Path, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

/// Runs `f` on another thread and fails if it does not finish within ten seconds (a FIFO
/// opened for reading without O_NONBLOCK would block forever).
fn within_ten_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the record store blocked")
}

const SECRET: &str = "TOP-SECRET-VALUE";

/// Symlinked record files: skipped with a warning by listings and `.meta` (one bad entry must
/// not hide the others), an error naming them for `get` (the caller asked for that record),
/// and replaced (not followed) by `set`.
#[test]
fn a_symlink_where_a_record_should_be_is_never_read() {
    for watch in [true, false] {
        let out = outside(&[
            ("session.json", json!({"id": "ses_link", "secret": SECRET})),
            (
                "message.json",
                json!({"id": "msg_link", "sessionId": "ses_7f3a", "role": "user", "secret": SECRET}),
            ),
        ]);
        let check_reads = reads_show_in_atime(out.path());
        let before = snapshot(out.path());
        let (tmp, store) = served_with(watch);
        let dir = tmp.path();
        // An absolute link, and one that climbs out with `..`.
        symlink(
            &out.path().join("session.json"),
            &dir.join("session/ses_link.json"),
        );
        let climbing = PathBuf::from("../..").join(out.path().strip_prefix("/").unwrap());
        symlink(
            &climbing.join("message.json"),
            &dir.join("message/msg_link.json"),
        );
        symlink(Path::new("/"), &dir.join("part/prt_root.json"));

        let err = call_err(&store, json!({"method": "session.get", "id": "ses_link"}));
        assert!(matches!(err, RecordError::Io(_)), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("session/ses_link.json is a symbolic link"),
            "{msg}"
        );
        assert!(!msg.contains(SECRET), "{msg}");
        let err = call_err(&store, json!({"method": "message.get", "id": "msg_link"}));
        assert!(err.to_string().contains("symbolic link"), "{err}");

        assert_eq!(
            store.meta_file("ses_link", &MetaPath::Session).unwrap(),
            None
        );
        assert!(store.meta_view("ses_link").unwrap().is_none());
        assert_eq!(message_ids(&store, "ses_7f3a").unwrap().len(), 4);
        assert_eq!(part_ids(&store, "ses_7f3a").unwrap().len(), 7);
        let view = store.meta_view("ses_7f3a").unwrap().unwrap();
        assert!(!String::from_utf8(view.history).unwrap().contains(SECRET));
        let list = call(
            &store,
            json!({"method": "message.listBySession", "sessionId": "ses_7f3a"}),
        );
        assert_eq!(list.as_array().unwrap().len(), 4);

        // `set` replaces the link itself; `delete_session` never reaches through one.
        let value = json!({"id": "ses_link", "model": "m"});
        call(
            &store,
            json!({"method": "session.set", "id": "ses_link", "value": value}),
        );
        assert!(
            fs::symlink_metadata(dir.join("session/ses_link.json"))
                .unwrap()
                .is_file()
        );
        assert_eq!(meta(&store, "ses_link", MetaPath::Session).unwrap(), value);
        store.delete_session("ses_7f3a").unwrap();
        assert!(
            fs::symlink_metadata(dir.join("message/msg_link.json"))
                .unwrap()
                .is_symlink()
        );

        assert_unchanged(&before, &snapshot(out.path()), check_reads);
    }
}

/// A FIFO (or socket) planted as a record: never waited on. Listings skip it with a warning;
/// `get` names it.
#[test]
fn a_fifo_where_a_record_should_be_does_not_block() {
    for watch in [true, false] {
        let (tmp, store) = served_with(watch);
        let dir = tmp.path().to_path_buf();
        let store = Arc::new(store);
        // Indexed before the FIFOs appear, and after.
        part_ids(&store, "ses_7f3a").unwrap();
        mkfifo(&dir.join("message/msg_fifo.json"));
        mkfifo(&dir.join("part/prt_fifo.json"));
        mkfifo(&dir.join("session/ses_fifo.json"));
        let s = Arc::clone(&store);
        let (view, list, err) = within_ten_seconds(move || {
            let view = s.meta_view("ses_7f3a").unwrap().unwrap();
            let list = s
                .handle(&json!({"method": "part.listBySession", "sessionId": "ses_7f3a"}))
                .unwrap();
            let err = s
                .handle(&json!({"method": "message.get", "id": "msg_fifo"}))
                .unwrap_err();
            (view, list, err)
        });
        assert_eq!(view.messages.len(), 4);
        assert_eq!(list.as_array().unwrap().len(), 7);
        assert!(err.to_string().contains("msg_fifo.json is a FIFO"), "{err}");
        // A store opened on a directory that already has them.
        drop(store);
        let store = within_ten_seconds(move || {
            let store = RecordStore::open_with(&dir, watch).unwrap();
            assert_eq!(part_ids(&store, "ses_7f3a").unwrap().len(), 7);
            assert_eq!(
                store.meta_file("ses_fifo", &MetaPath::Session).unwrap(),
                None
            );
            store
        });
        drop(store);
    }
}

/// A directory where a record should be: not a record; `set` over it fails naming it.
#[test]
fn a_directory_where_a_record_should_be_is_not_a_record() {
    let (tmp, store) = served();
    fs::create_dir(tmp.path().join("part/prt_dir.json")).unwrap();
    fs::write(tmp.path().join("part/prt_dir.json/x"), "{}").unwrap();
    assert_eq!(part_ids(&store, "ses_7f3a").unwrap().len(), 7);
    let err = call_err(&store, json!({"method": "part.get", "id": "prt_dir"}));
    assert!(
        err.to_string().contains("prt_dir.json is a directory"),
        "{err}"
    );
    let part = json!({"sessionId": "ses_7f3a", "messageId": "msg_0001", "index": 3});
    let err = call_err(
        &store,
        json!({"method": "part.set", "id": "prt_dir", "value": part}),
    );
    assert!(
        err.to_string().contains("prt_dir.json: it is a directory"),
        "{err}"
    );
    assert_eq!(temp_files(tmp.path()), Vec::<PathBuf>::new());
    assert_eq!(part_ids(&store, "ses_7f3a").unwrap().len(), 7);
}

/// A collection directory that is a symlink, at open or swapped in later: an error naming it
/// for every call that needs that collection (the daemon cannot serve it without following
/// the link), and nothing outside is read or written.
#[test]
fn a_collection_directory_replaced_by_a_symlink_is_refused() {
    for watch in [true, false] {
        let evil =
            json!({"id": "msg_evil", "sessionId": "ses_7f3a", "role": "user", "secret": SECRET});
        let out = outside(&[("msg_evil.json", evil)]);
        let check_reads = reads_show_in_atime(out.path());
        let before = snapshot(out.path());
        let (tmp, store) = served_with(watch);
        let dir = tmp.path();
        assert_eq!(message_ids(&store, "ses_7f3a").unwrap().len(), 4);
        fs::rename(dir.join("message"), dir.join("message.old")).unwrap();
        symlink(out.path(), &dir.join("message"));

        let symlinked = |err: &dyn fmt::Display| {
            let msg = err.to_string();
            assert!(
                msg.contains("/message is a symbolic link, not a directory"),
                "{msg}"
            );
            assert!(!msg.contains(SECRET), "{msg}");
        };
        symlinked(&store.meta_file("ses_7f3a", &MetaPath::History).unwrap_err());
        symlinked(
            &store
                .list_ids(ChildCollection::Part, "ses_7f3a")
                .unwrap_err(),
        );
        symlinked(&call_err(
            &store,
            json!({"method": "message.listBySession", "sessionId": "ses_7f3a"}),
        ));
        symlinked(&call_err(
            &store,
            json!({"method": "message.get", "id": "msg_evil"}),
        ));
        let value = json!({"sessionId": "ses_7f3a", "role": "user"});
        symlinked(&call_err(
            &store,
            json!({"method": "message.set", "id": "msg_new", "value": value}),
        ));
        symlinked(&store.delete_session("ses_7f3a").unwrap_err());
        // Other collections go on working.
        assert_eq!(
            call(&store, json!({"method": "setup.get", "id": "setup_v3"})),
            fixture("setup", "setup_v3")
        );
        drop(store);
        symlinked(&RecordStore::open_with(dir, watch).err().unwrap());

        // Put back, it is served again.
        fs::remove_file(dir.join("message")).unwrap();
        fs::rename(dir.join("message.old"), dir.join("message")).unwrap();
        let store = RecordStore::open_with(dir, watch).unwrap();
        assert_eq!(message_ids(&store, "ses_7f3a").unwrap().len(), 4);

        assert_unchanged(&before, &snapshot(out.path()), check_reads);
    }
}

/// The records dir itself may be a symlink: where it lives is the operator's choice.
#[test]
fn the_records_dir_itself_may_be_a_symlink() {
    let (tmp, store) = served();
    drop(store);
    let links = TempDir::new().unwrap();
    let link = links.path().join("records");
    symlink(tmp.path(), &link);
    let store = RecordStore::open(&link).unwrap();
    assert_eq!(
        call(&store, json!({"method": "session.get", "id": "ses_7f3a"})),
        fixture("session", "ses_7f3a")
    );
    assert_eq!(part_ids(&store, "ses_7f3a").unwrap().len(), 7);
    call(
        &store,
        json!({"method": "setup.set", "id": "setup_new", "value": {}}),
    );
    assert!(tmp.path().join("setup/setup_new.json").is_file());
}

/// The collection directory swapped with a symlink out, again and again, while records are
/// written and listed: every call either works on the real directory or fails naming the
/// link (or finds no directory, between two renames); nothing outside is ever written or read.
#[test]
fn a_collection_symlink_swapped_in_during_writes_is_never_followed() {
    let out = outside(&[("msg_0001.json", fixture("message", "msg_0001"))]);
    let check_reads = reads_show_in_atime(out.path());
    let before = snapshot(out.path());
    let (tmp, store) = served();
    let dir = tmp.path().to_path_buf();
    let link = dir.join("message.link");
    symlink(out.path(), &link);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (dir, stop) = (dir.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let (real, aside) = (dir.join("message"), dir.join("message.real"));
            let mut swaps = 0;
            while !stop.load(Ordering::Relaxed) {
                fs::rename(&real, &aside).unwrap();
                fs::rename(dir.join("message.link"), &real).unwrap();
                std::thread::sleep(Duration::from_micros(300));
                fs::rename(&real, dir.join("message.link")).unwrap();
                fs::rename(&aside, &real).unwrap();
                std::thread::sleep(Duration::from_millis(1));
                swaps += 1;
            }
            swaps
        })
    };
    let (mut worked, mut refused) = (0, 0);
    for i in 0..300 {
        let value = json!({"sessionId": "ses_7f3a", "role": "user", "createdAt": i});
        let calls = [
            json!({"method": "message.set", "id": format!("msg_r{i}"), "value": value}),
            json!({"method": "message.listBySession", "sessionId": "ses_7f3a"}),
            json!({"method": "message.get", "id": "msg_0001"}),
        ];
        for req in calls {
            match store.handle(&req) {
                Ok(_) => worked += 1,
                Err(err) => {
                    // The link, or nothing between two renames.
                    let msg = err.to_string();
                    assert!(
                        msg.contains(", not a directory; the records store never follows")
                            || msg.contains("No such file or directory"),
                        "{msg}"
                    );
                    refused += 1;
                }
            }
        }
        let _ = store.meta_file("ses_7f3a", &MetaPath::History);
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(
        swaps > 0 && worked > 0,
        "{swaps} swaps, {worked} calls worked"
    );
    eprintln!("{swaps} swaps: {worked} calls worked, {refused} refused");
    assert_unchanged(&before, &snapshot(out.path()), check_reads);
    // Every record written landed in the real directory.
    let written = fs::read_dir(dir.join("message"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_str()
                .unwrap()
                .starts_with("msg_r")
        })
        .count();
    assert!(written > 0);
    assert_eq!(temp_files(&dir), Vec::<PathBuf>::new());
}
