//! Storage grants: which parts of a space a mount may read or write.
//!
//! A grant is the `storage` scope of a MeshAgent participant token: a list of
//! path prefixes, each read-only or read-write. This module only decides; it
//! does no I/O and knows nothing about FUSE.
//!
//! Paths handed to the decision functions are relative to the space root, as
//! raw bytes with `/` separators and no leading `/`; `b""` is the root. They
//! must be canonical: a path with an empty, `.` or `..` segment (or a NUL) is
//! always refused, whatever the grant says.

use std::fmt;

use serde_json::{Map, Value, json};

/// The kind of access an operation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reading content or metadata.
    Read,
    /// Creating, changing or removing anything.
    Write,
}

/// Why [`Grant::check`] refused an operation. Both map to `EACCES` at the mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No granted prefix covers the path.
    Outside,
    /// The covering prefix is read-only and the operation writes.
    ReadOnly,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Denied::Outside => "path is outside the grant",
            Denied::ReadOnly => "path is read-only in the grant",
        })
    }
}

/// A grant that could not be built; the message names the offending value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantError(String);

impl fmt::Display for GrantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GrantError {}

/// One granted prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantRule {
    /// Prefix without leading or trailing `/`; `""` is the whole space.
    pub path: String,
    /// Whether writes under this prefix are refused.
    pub read_only: bool,
}

/// The set of prefixes a mount may touch.
///
/// `rules == None` is full access; `Some(vec![])` is no access at all.
/// Rules are kept normalised, de-duplicated and sorted by path, so two grants
/// with the same meaning compare equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    rules: Option<Vec<GrantRule>>,
}

impl Default for Grant {
    /// Full access: a mount without `--grant` or token is the operator's own.
    fn default() -> Grant {
        Grant::full()
    }
}

impl Grant {
    /// Full read-write access to the whole space (the operator's own mount).
    pub fn full() -> Grant {
        Grant { rules: None }
    }

    /// No access at all: nothing can be read, written or listed.
    pub fn none() -> Grant {
        Grant {
            rules: Some(Vec::new()),
        }
    }

    /// Whether this is the unrestricted grant.
    pub fn is_full(&self) -> bool {
        self.rules.is_none()
    }

    /// Builds a grant from prefixes, normalising each path.
    ///
    /// When the same prefix is listed twice with different modes, read-only
    /// wins. An empty list is [`Grant::none`].
    pub fn from_rules(rules: Vec<GrantRule>) -> Result<Grant, GrantError> {
        let mut out: Vec<GrantRule> = Vec::with_capacity(rules.len());
        for rule in rules {
            let path = normalise(&rule.path)?;
            match out.iter_mut().find(|r| r.path == path) {
                Some(existing) => existing.read_only |= rule.read_only,
                None => out.push(GrantRule {
                    path,
                    read_only: rule.read_only,
                }),
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Grant { rules: Some(out) })
    }

    /// Parses `--grant` specs: `PATH[:ro|:rw]`, e.g. `inputs/:ro`, `outputs`
    /// (read-write by default). `/`, `.` or an empty path (`:ro`) is the
    /// whole space.
    ///
    /// The text after the last `:` must be `ro` or `rw`, so a path that itself
    /// contains `:` is written with an explicit mode (`a:b:rw`). No specs at
    /// all means full access.
    /// A `grant` field of the API or the config: left out (`None`) is full access, as no
    /// `--grant` is; an empty list is refused, since it reads as "nothing" (a client that
    /// filtered its prefixes down to none) and would grant everything.
    pub fn parse_field(specs: Option<&[String]>) -> Result<Grant, GrantError> {
        match specs {
            None => Ok(Grant::full()),
            Some([]) => Err(GrantError(
                "an empty grant grants nothing: leave \"grant\" out for access to the whole \
                 space, or name prefixes (PATH:ro or PATH:rw)"
                    .into(),
            )),
            Some(specs) => Grant::parse_cli(specs),
        }
    }

    pub fn parse_cli(specs: &[String]) -> Result<Grant, GrantError> {
        if specs.is_empty() {
            return Ok(Grant::full());
        }
        let mut rules = Vec::with_capacity(specs.len());
        for spec in specs {
            let (path, read_only) = match spec.rsplit_once(':') {
                None => (spec.as_str(), false),
                Some((path, "ro")) => (path, true),
                Some((path, "rw")) => (path, false),
                Some((_, mode)) => {
                    return Err(GrantError(format!(
                        "grant {spec:?} has unknown mode {mode:?} (expected PATH:ro or PATH:rw; \
                         a path containing ':' is given with its mode, as in a:b:rw)"
                    )));
                }
            };
            if path.is_empty() {
                // Most likely an empty variable where a path was meant: not the whole space.
                return Err(GrantError(format!(
                    "grant {spec:?} has no path (give / for the whole space)"
                )));
            }
            rules.push(GrantRule {
                path: path.to_owned(),
                read_only,
            });
        }
        Grant::from_rules(rules)
    }

    /// Reads the MeshAgent `storage` scope object.
    ///
    /// `paths` missing or `null` is full access (MeshAgent omits a `null`
    /// `paths` when serialising); a `read_only` that is missing defaults to
    /// `false`, as in MeshAgent. Unknown keys are ignored.
    pub fn from_storage_scope(v: &Value) -> Result<Grant, GrantError> {
        let Some(scope) = v.as_object() else {
            return Err(GrantError(format!(
                "storage scope must be a JSON object, found {v}"
            )));
        };
        let paths = match scope.get("paths") {
            None | Some(Value::Null) => return Ok(Grant::full()),
            Some(Value::Array(paths)) => paths,
            Some(other) => {
                return Err(GrantError(format!(
                    "storage scope \"paths\" must be an array or null, found {other}"
                )));
            }
        };
        let mut rules = Vec::with_capacity(paths.len());
        for entry in paths {
            let path = entry.get("path").and_then(Value::as_str).ok_or_else(|| {
                GrantError(format!("storage path entry {entry} has no string \"path\""))
            })?;
            let read_only = match entry.get("read_only") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(GrantError(format!(
                        "storage path entry {entry} has a non-boolean \"read_only\": {other}"
                    )));
                }
            };
            rules.push(GrantRule {
                path: path.to_owned(),
                read_only,
            });
        }
        Grant::from_rules(rules)
    }

    /// Serialises to the MeshAgent `storage` scope: `{"paths": null}` for full
    /// access, otherwise `{"paths": [{"path": "inputs/", "read_only": true}, ..]}`.
    ///
    /// Prefixes get a trailing `/` so that MeshAgent's plain string-prefix
    /// matching agrees with ours; the whole space is `""`. No access is an
    /// empty array.
    pub fn to_storage_scope(&self) -> Value {
        let paths = match &self.rules {
            None => Value::Null,
            Some(rules) => rules
                .iter()
                .map(|r| {
                    let path = if r.path.is_empty() {
                        String::new()
                    } else {
                        format!("{}/", r.path)
                    };
                    json!({ "path": path, "read_only": r.read_only })
                })
                .collect(),
        };
        let mut scope = Map::new();
        scope.insert("paths".to_owned(), paths);
        Value::Object(scope)
    }

    /// The decision for an operation on `path` needing `access`: the longest
    /// granted prefix covering `path` decides.
    pub fn check(&self, path: &[u8], access: Access) -> Result<(), Denied> {
        if !is_canonical(path) {
            return Err(Denied::Outside);
        }
        let Some(rules) = &self.rules else {
            return Ok(());
        };
        let covering = rules
            .iter()
            .filter(|r| covers(r.path.as_bytes(), path))
            .max_by_key(|r| r.path.len());
        match covering {
            None => Err(Denied::Outside),
            Some(r) if r.read_only && access == Access::Write => Err(Denied::ReadOnly),
            Some(_) => Ok(()),
        }
    }

    /// Whether the same granted prefix governs `a` and `b` (a hard link between them carries
    /// no file across the grant's boundaries); always true for full access.
    pub fn same_rule(&self, a: &[u8], b: &[u8]) -> bool {
        let Some(rules) = &self.rules else {
            return true;
        };
        let governing = |path: &[u8]| {
            rules
                .iter()
                .filter(|r| covers(r.path.as_bytes(), path))
                .max_by_key(|r| r.path.len())
                .map(|r| r.path.clone())
        };
        governing(a).is_some() && governing(a) == governing(b)
    }

    /// This grant with everything under `prefix` made read-only (paths under it stay hidden
    /// if the grant did not cover them). Used to keep the `.meta` view read-only.
    pub fn with_read_only(&self, prefix: &str) -> Grant {
        let prefix = normalise(prefix).expect("a valid built-in prefix");
        let mut rules = match &self.rules {
            None => vec![GrantRule {
                path: String::new(),
                read_only: false,
            }],
            Some(rules) => rules.clone(),
        };
        let covered = self.check(prefix.as_bytes(), Access::Read).is_ok();
        for rule in rules.iter_mut() {
            if covers(prefix.as_bytes(), rule.path.as_bytes()) {
                rule.read_only = true;
            }
        }
        if covered && !rules.iter().any(|r| r.path == prefix) {
            rules.push(GrantRule {
                path: prefix,
                read_only: true,
            });
        }
        rules.sort_by(|a, b| a.path.cmp(&b.path));
        Grant { rules: Some(rules) }
    }

    /// Whether directory `dir` may be looked up in, stat'ed and listed: true
    /// for readable directories and for ancestors of a granted prefix (their
    /// listings are then filtered by [`Grant::shows`]).
    ///
    /// The root is always traversable, even with [`Grant::none`], so the mount
    /// point itself can be stat'ed; it then lists as empty.
    pub fn can_traverse(&self, dir: &[u8]) -> bool {
        dir.is_empty() || self.check(dir, Access::Read).is_ok() || self.leads_to(dir)
    }

    /// Whether entry `name` of directory `dir` may appear in a listing or be
    /// looked up: it is readable, or it is an ancestor of a granted prefix.
    pub fn shows(&self, dir: &[u8], name: &[u8]) -> bool {
        if name.is_empty() || name.contains(&b'/') {
            return false;
        }
        let child = if dir.is_empty() {
            name.to_vec()
        } else {
            [dir, b"/", name].concat()
        };
        self.check(&child, Access::Read).is_ok() || self.leads_to(&child)
    }

    /// Whether canonical `path` is a strict ancestor of some granted prefix (moving or
    /// replacing it would carry differently granted paths along).
    pub fn leads_to(&self, path: &[u8]) -> bool {
        if !is_canonical(path) {
            return false;
        }
        self.rules.as_ref().is_some_and(|rules| {
            rules.iter().any(|r| {
                let p = r.path.as_bytes();
                p.len() > path.len() && covers(path, p)
            })
        })
    }
}

/// CLI form, e.g. `inputs/:ro, outputs/:rw`; `/` is the whole space.
impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(rules) = &self.rules else {
            return f.write_str("full access");
        };
        if rules.is_empty() {
            return f.write_str("no access");
        }
        for (i, r) in rules.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let mode = if r.read_only { "ro" } else { "rw" };
            write!(f, "{sep}{}/:{mode}", r.path)?;
        }
        Ok(())
    }
}

/// Normalises a granted prefix: strips leading/trailing `/`, collapses
/// repeated `/`, drops `.` segments. `..`, NUL and other control characters
/// (a newline pasted into a path) are refused.
fn normalise(raw: &str) -> Result<String, GrantError> {
    if raw.contains('\0') {
        return Err(GrantError(format!(
            "grant path {raw:?} contains a NUL byte"
        )));
    }
    if raw.chars().any(char::is_control) {
        return Err(GrantError(format!(
            "grant path {raw:?} contains a control character (grants name paths of printable \
             characters)"
        )));
    }
    let mut segments = Vec::new();
    for seg in raw.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                return Err(GrantError(format!(
                    "grant path {raw:?} contains a \"..\" segment"
                )));
            }
            s => segments.push(s),
        }
    }
    Ok(segments.join("/"))
}

/// Whether `path` is the root or `/`-separated segments that are neither
/// empty, `.` nor `..`, without NUL.
pub(crate) fn is_canonical(path: &[u8]) -> bool {
    path.is_empty()
        || (!path.contains(&0)
            && path
                .split(|&b| b == b'/')
                .all(|s| !s.is_empty() && s != b"." && s != b".."))
}

/// Whether prefix `prefix` (normalised, `""` = everything) covers `path`
/// segment-wise: `out` covers `out` and `out/x`, not `outputs`.
fn covers(prefix: &[u8], path: &[u8]) -> bool {
    prefix.is_empty()
        || (path.starts_with(prefix) && (path.len() == prefix.len() || path[prefix.len()] == b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_paths_with_control_characters_are_refused() {
        for spec in ["out\nputs/:rw", "a\tb:ro", "x\u{7f}", "logs\r"] {
            let e = Grant::parse_cli(&[spec.to_string()])
                .unwrap_err()
                .to_string();
            assert!(e.contains("control character"), "{spec:?}: {e}");
        }
        // From a token's storage scope too.
        let scope = json!({"paths": [{"path": "a\nb/", "read_only": false}]});
        assert!(Grant::from_storage_scope(&scope).is_err());
        // A ':' in a path stays a path: the text after the last ':' is the mode.
        let g = Grant::parse_cli(&["foo:ro:rw".into()]).unwrap();
        assert_eq!(g.to_string(), "foo:ro/:rw");
        let e = Grant::parse_cli(&["foo:bar".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown mode \"bar\"") && e.contains("a:b:rw"),
            "{e}"
        );
        // Printable non-ASCII is fine.
        assert!(Grant::parse_cli(&["données/:ro".into()]).is_ok());
    }

    #[test]
    fn with_read_only_locks_a_subtree_without_widening() {
        let full = Grant::full().with_read_only(".meta/");
        assert!(full.check(b"x/y", Access::Write).is_ok());
        assert_eq!(
            full.check(b".meta/session.json", Access::Write),
            Err(Denied::ReadOnly)
        );
        assert!(full.check(b".meta/session.json", Access::Read).is_ok());
        let narrow = Grant::parse_cli(&["outputs/:rw".into()])
            .unwrap()
            .with_read_only(".meta");
        assert_eq!(
            narrow.check(b".meta/session.json", Access::Read),
            Err(Denied::Outside)
        );
        let meta_rw = Grant::parse_cli(&[".meta/messages:rw".into()])
            .unwrap()
            .with_read_only(".meta");
        assert_eq!(
            meta_rw.check(b".meta/messages/m.json", Access::Write),
            Err(Denied::ReadOnly)
        );
        assert_eq!(
            meta_rw.check(b".meta/session.json", Access::Read),
            Err(Denied::Outside)
        );
    }

    fn rule(path: &str, read_only: bool) -> GrantRule {
        GrantRule {
            path: path.to_owned(),
            read_only,
        }
    }

    fn cli(specs: &[&str]) -> Grant {
        let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        Grant::parse_cli(&specs).unwrap()
    }

    fn cli_err(spec: &str) -> String {
        Grant::parse_cli(&[spec.to_owned()])
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_grant_field_left_out_is_full_access_and_an_empty_one_is_refused() {
        assert!(Grant::parse_field(None).unwrap().is_full());
        let e = Grant::parse_field(Some(&[])).unwrap_err().to_string();
        assert!(e.contains("an empty grant grants nothing"), "{e}");
        let g = Grant::parse_field(Some(&["out/:ro".to_owned()])).unwrap();
        assert!(g.check(b"out/x", Access::Read).is_ok());
        assert!(g.check(b"out/x", Access::Write).is_err());
        assert!(g.check(b"in/x", Access::Read).is_err());
    }

    #[test]
    fn matching_is_per_segment() {
        let g = cli(&["out/"]);
        assert_eq!(g.check(b"outputs/x", Access::Read), Err(Denied::Outside));
        assert_eq!(g.check(b"outputs", Access::Read), Err(Denied::Outside));
        assert_eq!(g.check(b"out", Access::Read), Ok(()));

        let g = cli(&["outputs/"]);
        assert_eq!(g.check(b"outputs", Access::Write), Ok(()));
        assert_eq!(g.check(b"outputs/a/b", Access::Write), Ok(()));
        assert_eq!(g.check(b"outputs2", Access::Read), Err(Denied::Outside));
        assert_eq!(g.check(b"", Access::Read), Err(Denied::Outside));
    }

    #[test]
    fn prefixes_are_normalised() {
        let expected = Grant::from_rules(vec![rule("a/b", false)]).unwrap();
        for raw in ["a/b", "/a/b/", "a//b", "./a/./b/.", "//a///b//"] {
            assert_eq!(
                Grant::from_rules(vec![rule(raw, false)]).unwrap(),
                expected,
                "{raw}"
            );
        }
    }

    #[test]
    fn bad_prefixes_are_refused_with_the_value_named() {
        let err = cli_err("a/../b:ro");
        assert!(err.contains("a/../b") && err.contains(".."), "{err}");
        let err = cli_err("..");
        assert!(err.contains(".."), "{err}");
        let err = cli_err("a\0b");
        assert!(err.contains("NUL") && err.contains("a\\0b"), "{err}");
        let err = cli_err("inputs/:rx");
        assert!(err.contains("inputs/:rx") && err.contains("rx"), "{err}");
    }

    #[test]
    fn cli_forms() {
        let g = cli(&["inputs/:ro", "outputs/:rw", "logs"]);
        assert_eq!(
            g,
            Grant::from_rules(vec![
                rule("inputs", true),
                rule("outputs", false),
                rule("logs", false)
            ])
            .unwrap()
        );
        let whole_ro = Grant::from_rules(vec![rule("", true)]).unwrap();
        for spec in ["/:ro", ".:ro", "./:ro"] {
            assert_eq!(cli(&[spec]), whole_ro, "{spec}");
        }
        // No path at all is most likely an empty variable, not the whole space.
        for spec in ["", ":ro", ":rw"] {
            let e = Grant::parse_cli(&[spec.to_owned()]).unwrap_err();
            assert!(e.to_string().contains("no path"), "{spec}: {e}");
        }
        assert_eq!(
            cli(&["."]),
            Grant::from_rules(vec![rule("", false)]).unwrap()
        );
        // A ':' inside a path needs an explicit mode.
        assert_eq!(
            cli(&["a:b:rw"]),
            Grant::from_rules(vec![rule("a:b", false)]).unwrap()
        );
        assert!(Grant::parse_cli(&[]).unwrap().is_full());
    }

    #[test]
    fn whole_space_grant() {
        let g = cli(&["/:ro"]);
        assert!(!g.is_full());
        assert_eq!(g.check(b"", Access::Read), Ok(()));
        assert_eq!(g.check(b"any/thing", Access::Read), Ok(()));
        assert_eq!(g.check(b"any/thing", Access::Write), Err(Denied::ReadOnly));
        assert!(g.shows(b"", b"secret"));
    }

    #[test]
    fn links_stay_within_one_granted_prefix() {
        let g =
            Grant::parse_cli(&["out/:rw".into(), "out/keep/:rw".into(), "tmp/:rw".into()]).unwrap();
        assert!(g.same_rule(b"out/a", b"out/b/c"));
        assert!(
            !g.same_rule(b"out/a", b"out/keep/a"),
            "a longer prefix governs"
        );
        assert!(!g.same_rule(b"out/a", b"tmp/a"));
        assert!(!g.same_rule(b"x", b"y"), "outside the grant");
        assert!(Grant::full().same_rule(b"a", b"b/c"));
    }

    #[test]
    fn longest_prefix_decides() {
        let g = cli(&["a/:rw", "a/b/:ro"]);
        assert_eq!(g.check(b"a/b/c", Access::Write), Err(Denied::ReadOnly));
        assert_eq!(g.check(b"a/b", Access::Write), Err(Denied::ReadOnly));
        assert_eq!(g.check(b"a/b/c", Access::Read), Ok(()));
        assert_eq!(g.check(b"a/x", Access::Write), Ok(()));
        assert_eq!(g.check(b"a/bc", Access::Write), Ok(()));

        let g = cli(&["a/:ro", "a/b/:rw"]);
        assert_eq!(g.check(b"a/b/c", Access::Write), Ok(()));
        assert_eq!(g.check(b"a/x", Access::Write), Err(Denied::ReadOnly));

        let g = cli(&["/:ro", "outputs/:rw"]);
        assert_eq!(g.check(b"outputs/x", Access::Write), Ok(()));
        assert_eq!(g.check(b"inputs/x", Access::Write), Err(Denied::ReadOnly));
    }

    #[test]
    fn duplicate_prefix_read_only_wins() {
        for specs in [["data/:rw", "data:ro"], ["data:ro", "/data/:rw"]] {
            let g = cli(&specs);
            assert_eq!(g, Grant::from_rules(vec![rule("data", true)]).unwrap());
            assert_eq!(g.check(b"data/x", Access::Write), Err(Denied::ReadOnly));
        }
    }

    #[test]
    fn case_sensitive() {
        let g = cli(&["inputs/"]);
        assert_eq!(g.check(b"Inputs/x", Access::Read), Err(Denied::Outside));
        assert_eq!(g.check(b"inputs/x", Access::Read), Ok(()));
    }

    #[test]
    fn dot_segments_and_odd_paths_are_denied() {
        for g in [cli(&["inputs/"]), cli(&["/"]), Grant::full()] {
            for path in [
                &b"inputs/../secret"[..],
                b"inputs/..",
                b"inputs/./x",
                b"..",
                b".",
                b"/inputs",
                b"inputs/",
                b"inputs//x",
                b"inputs/a\0b",
            ] {
                assert_eq!(
                    g.check(path, Access::Read),
                    Err(Denied::Outside),
                    "{path:?}"
                );
                assert!(!g.shows(b"", path), "{path:?}");
            }
            assert!(!g.can_traverse(b"inputs/.."));
            assert!(!g.shows(b"inputs", b".."));
            assert!(!g.shows(b"", b""));
        }
    }

    #[test]
    fn invalid_utf8_names() {
        let g = cli(&["inputs/"]);
        assert_eq!(g.check(b"inputs/\xff\xfe", Access::Read), Ok(()));
        assert!(g.shows(b"inputs", b"\xff"));
        assert_eq!(g.check(b"\xff/inputs", Access::Read), Err(Denied::Outside));
    }

    #[test]
    fn read_needs_cover_and_write_needs_rw_cover() {
        let g = cli(&["inputs/:ro", "outputs/:rw"]);
        assert_eq!(g.check(b"inputs/f", Access::Read), Ok(()));
        assert_eq!(g.check(b"inputs/f", Access::Write), Err(Denied::ReadOnly));
        assert_eq!(g.check(b"outputs/f", Access::Write), Ok(()));
        assert_eq!(g.check(b"secret", Access::Read), Err(Denied::Outside));
        assert_eq!(g.check(b"secret", Access::Write), Err(Denied::Outside));
    }

    #[test]
    fn traversal_and_listing_filter() {
        let g = cli(&["inputs/", "outputs/data/"]);
        assert!(g.can_traverse(b""));
        assert!(g.can_traverse(b"outputs"));
        assert!(g.can_traverse(b"outputs/data"));
        assert!(g.can_traverse(b"outputs/data/deep"));
        assert!(g.can_traverse(b"inputs/sub"));
        assert!(!g.can_traverse(b"secret"));
        assert!(!g.can_traverse(b"outputs/other"));
        assert!(!g.can_traverse(b"output"));
        // `outputs` itself is only traversable, not readable as content.
        assert_eq!(g.check(b"outputs", Access::Read), Err(Denied::Outside));

        assert!(g.shows(b"", b"inputs"));
        assert!(g.shows(b"", b"outputs"));
        assert!(!g.shows(b"", b"secret"));
        assert!(!g.shows(b"", b"out"));
        assert!(g.shows(b"outputs", b"data"));
        assert!(!g.shows(b"outputs", b"other"));
        assert!(g.shows(b"outputs/data", b"anything"));
        assert!(g.shows(b"inputs", b"anything"));
        assert!(!g.shows(b"secret", b"x"));
        assert!(!g.shows(b"", b"inputs/x"));
    }

    #[test]
    fn full_and_none() {
        let full = Grant::full();
        assert!(full.is_full());
        assert_eq!(full.check(b"", Access::Write), Ok(()));
        assert_eq!(full.check(b"a/b", Access::Write), Ok(()));
        assert!(full.shows(b"", b"secret"));
        assert!(full.can_traverse(b"x/y"));

        let none = Grant::none();
        assert!(!none.is_full());
        assert!(none.can_traverse(b""));
        assert!(!none.can_traverse(b"x"));
        assert!(!none.shows(b"", b"x"));
        assert_eq!(none.check(b"", Access::Read), Err(Denied::Outside));
        assert_eq!(none.check(b"x", Access::Read), Err(Denied::Outside));
        assert_eq!(Grant::from_rules(Vec::new()).unwrap(), none);
    }

    #[test]
    fn storage_scope_json() {
        assert!(
            Grant::from_storage_scope(&json!({ "paths": null }))
                .unwrap()
                .is_full()
        );
        // MeshAgent drops `paths: null` when it serialises a default StorageGrant.
        assert!(Grant::from_storage_scope(&json!({})).unwrap().is_full());
        assert_eq!(
            Grant::from_storage_scope(&json!({ "paths": [] })).unwrap(),
            Grant::none()
        );
        let g = Grant::from_storage_scope(&json!({ "paths": [
            { "path": "inputs/", "read_only": true },
            { "path": "outputs/", "read_only": false },
            { "path": "logs" },
        ]}))
        .unwrap();
        assert_eq!(g, cli(&["inputs:ro", "outputs:rw", "logs:rw"]));

        for bad in [
            json!("x"),
            json!({ "paths": "inputs/" }),
            json!({ "paths": [{ "read_only": true }] }),
            json!({ "paths": [{ "path": 3 }] }),
            json!({ "paths": [{ "path": "a", "read_only": "yes" }] }),
        ] {
            assert!(Grant::from_storage_scope(&bad).is_err(), "{bad}");
        }
        let err = Grant::from_storage_scope(&json!({ "paths": [{ "path": "a/../../etc" }] }))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a/../../etc"), "{err}");
    }

    #[test]
    fn storage_scope_round_trip() {
        let g = cli(&["inputs/:ro", "outputs/data:rw", "/:ro"]);
        let v = g.to_storage_scope();
        assert_eq!(
            v,
            json!({ "paths": [
                { "path": "", "read_only": true },
                { "path": "inputs/", "read_only": true },
                { "path": "outputs/data/", "read_only": false },
            ]})
        );
        assert_eq!(Grant::from_storage_scope(&v).unwrap(), g);
        for g in [Grant::full(), Grant::none()] {
            assert_eq!(Grant::from_storage_scope(&g.to_storage_scope()).unwrap(), g);
        }
        assert_eq!(Grant::full().to_storage_scope(), json!({ "paths": null }));
    }

    #[test]
    fn display_is_cli_form() {
        let g = cli(&["outputs/:rw", "inputs/:ro", "/:ro"]);
        assert_eq!(g.to_string(), "/:ro, inputs/:ro, outputs/:rw");
        let specs: Vec<String> = g.to_string().split(", ").map(str::to_owned).collect();
        assert_eq!(Grant::parse_cli(&specs).unwrap(), g);
        assert_eq!(Grant::full().to_string(), "full access");
        assert_eq!(Grant::none().to_string(), "no access");
    }
}
