//! HS256 JWTs in the MeshAgent participant-token format.
//!
//! Claims look like `{"name", "sub"?, "iat"?, "exp"?, "grants": [..]}` where
//! `grants` holds `{"name": "room", "scope": ROOM}` and
//! `{"name": "api", "scope": {"storage": {"paths": ..}}}` among others.
//!
//! Verification accepts HS256 only, checks `exp` with no leeway (expired once
//! `now >= exp`) and `nbf` when present, and accepts tokens without `exp`
//! (MeshAgent mints such tokens when no expiration is given).
//!
//! Invariants of [`verify`]:
//! - A header with `crit` is refused whatever it lists: roomfs understands no
//!   JWS extension, and RFC 7515 §4.1.11 says a token whose critical
//!   extensions are not understood must be rejected.
//! - `exp`, `nbf` and `iat`, when present, are JSON numbers that are valid
//!   NumericDates; `null` or any other type is malformed, never "absent" (a
//!   `"exp": null` must not read as "never expires").
//! - At most one `room` grant and at most one `api` grant: a token with two
//!   is ambiguous and refused, whatever they say.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value, json};

use crate::error::Invalid;
use crate::grant::Grant;

/// One entry of the `grants` claim; `scope` is a string or an object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrantEntry {
    pub name: String,
    #[serde(default)]
    pub scope: Value,
}

/// The claims of a participant token. Claims not named here (`kid`,
/// `version`, ...) are kept in `extra`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenClaims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Issued-at, seconds since the epoch.
    #[serde(
        default,
        deserialize_with = "iat_date",
        skip_serializing_if = "Option::is_none"
    )]
    pub iat: Option<u64>,
    /// Not-before, seconds since the epoch.
    #[serde(
        default,
        deserialize_with = "nbf_date",
        skip_serializing_if = "Option::is_none"
    )]
    pub nbf: Option<u64>,
    /// Expiry, seconds since the epoch.
    #[serde(
        default,
        deserialize_with = "exp_date",
        skip_serializing_if = "Option::is_none"
    )]
    pub exp: Option<u64>,
    pub grants: Vec<GrantEntry>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What a valid token allows.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedToken {
    /// The `room` grant's scope.
    pub room: Option<String>,
    /// The storage grant; [`Grant::none`] without an `api` grant or without
    /// `storage` in it.
    pub grant: Grant,
    pub name: Option<String>,
    pub exp: Option<u64>,
}

/// Why a token could not be issued or was rejected.
#[derive(Debug)]
pub enum TokenError {
    /// The HMAC secret is empty.
    EmptySecret,
    /// The signature was not made with this secret (or the token was altered).
    BadSignature,
    /// `exp` is in the past.
    Expired { exp: u64 },
    /// `nbf` is in the future.
    NotYetValid,
    /// The header names an algorithm other than HS256 (including `none`).
    UnsupportedAlgorithm(String),
    /// Not a well-formed JWT or not participant-token claims.
    Malformed(String),
    /// The grants are inconsistent or a storage path is invalid.
    BadGrant(String),
    /// The participant's name or the room cannot be used: the name is shown in events as the
    /// participant (a label's rules), the room must be a valid room id.
    BadClaim(String),
    /// Signing failed while issuing.
    Encode(String),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::EmptySecret => write!(f, "the token secret is empty"),
            TokenError::BadSignature => write!(f, "token signature does not match the secret"),
            TokenError::Expired { exp } => {
                write!(f, "token expired at {} (exp={exp})", utc_string(*exp))
            }
            TokenError::NotYetValid => write!(f, "token is not valid yet (nbf is in the future)"),
            TokenError::UnsupportedAlgorithm(alg) => {
                write!(f, "token algorithm {alg:?} is not accepted (only HS256)")
            }
            TokenError::Malformed(why) => write!(f, "token is malformed: {why}"),
            TokenError::BadGrant(why) => write!(f, "token grant is invalid: {why}"),
            TokenError::BadClaim(why) => write!(f, "token is invalid: {why}"),
            TokenError::Encode(why) => write!(f, "could not sign the token: {why}"),
        }
    }
}

impl std::error::Error for TokenError {}

/// Mints a token for participant `name` in `room` carrying `grant` as its
/// storage scope, valid for `ttl` from now.
pub fn issue(
    secret: &[u8],
    name: &str,
    room: &str,
    grant: &Grant,
    ttl: Duration,
) -> Result<String, TokenError> {
    if secret.is_empty() {
        return Err(TokenError::EmptySecret);
    }
    check_claims(Some(name), Some(room))?;
    let now = now_secs();
    let claims = TokenClaims {
        name: Some(name.to_owned()),
        sub: None,
        iat: Some(now),
        nbf: None,
        exp: Some(now.saturating_add(ttl.as_secs())),
        grants: vec![
            GrantEntry {
                name: "room".to_owned(),
                scope: Value::String(room.to_owned()),
            },
            GrantEntry {
                name: "api".to_owned(),
                scope: json!({ "storage": grant.to_storage_scope() }),
            },
        ],
        extra: Map::new(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| TokenError::Encode(e.to_string()))
}

/// Checks `token` (surrounding whitespace ignored) against `secret` and
/// extracts its room and storage grant.
///
/// More than one `room` grant or more than one `api` grant is refused as
/// ambiguous (MeshAgent never mints that); a non-string `room` scope or a
/// non-object `api` scope likewise.
pub fn verify(token: &str, secret: &[u8]) -> Result<VerifiedToken, TokenError> {
    if secret.is_empty() {
        return Err(TokenError::EmptySecret);
    }
    let token = token.trim();
    check_header(token)?;

    let mut validation = Validation::new(Algorithm::HS256);
    validation.required_spec_claims.clear();
    validation.leeway = 0;
    // Both checked below: to report the expiry time, and because the library
    // reads a null `nbf` differently from TokenClaims.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let claims =
        jsonwebtoken::decode::<TokenClaims>(token, &DecodingKey::from_secret(secret), &validation)
            .map_err(|e| match e.into_kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::Base64(e) => TokenError::Malformed(format!("bad base64url: {e}")),
                ErrorKind::Json(e) => {
                    TokenError::Malformed(format!("claims are not a participant token: {e}"))
                }
                ErrorKind::Utf8(e) => TokenError::Malformed(format!("claims are not UTF-8: {e}")),
                other => TokenError::Malformed(format!("{other:?}")),
            })?
            .claims;

    let now = now_secs();
    if let Some(exp) = claims.exp
        && now >= exp
    {
        return Err(TokenError::Expired { exp });
    }
    if let Some(nbf) = claims.nbf
        && now < nbf
    {
        return Err(TokenError::NotYetValid);
    }

    let mut rooms = claims.grants.iter().filter(|g| g.name == "room");
    let room = match (rooms.next(), rooms.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => {
            return Err(TokenError::BadGrant(
                "token has more than one room grant, so its room is ambiguous".to_owned(),
            ));
        }
        (
            Some(GrantEntry {
                scope: Value::String(room),
                ..
            }),
            None,
        ) => Some(room.clone()),
        (Some(g), None) => {
            return Err(TokenError::BadGrant(format!(
                "room grant scope must be a string, found {}",
                g.scope
            )));
        }
    };

    let mut api = claims.grants.iter().filter(|g| g.name == "api");
    let grant = match (api.next(), api.next()) {
        (None, _) => Grant::none(),
        (Some(_), Some(_)) => {
            return Err(TokenError::BadGrant(
                "token has more than one api grant".to_owned(),
            ));
        }
        (Some(g), None) => {
            let Some(scope) = g.scope.as_object() else {
                return Err(TokenError::BadGrant(format!(
                    "api grant scope must be an object, found {}",
                    g.scope
                )));
            };
            match scope.get("storage") {
                None | Some(Value::Null) => Grant::none(),
                Some(storage) => Grant::from_storage_scope(storage)
                    .map_err(|e| TokenError::BadGrant(e.to_string()))?,
            }
        }
    };

    check_claims(claims.name.as_deref(), room.as_deref())?;
    Ok(VerifiedToken {
        room,
        grant,
        name: claims.name,
        exp: claims.exp,
    })
}

/// Checks a token's participant name (shown in every event of its mounts, like a mount's
/// label) and room (a room id).
fn check_claims(name: Option<&str>, room: Option<&str>) -> Result<(), TokenError> {
    if let Some(name) = name {
        crate::events::check_label(name)
            .map_err(|e| TokenError::BadClaim(format!("its name: {}", e.0)))?;
    }
    if let Some(room) = room {
        crate::space::SpaceId::new(crate::space::SpaceKind::Room, room)
            .map_err(|e| TokenError::BadClaim(e.0))?;
    }
    Ok(())
}

/// Parses a lifetime: a whole number with an optional unit `s`, `m`, `h` or
/// `d` (`"45s"`, `"30m"`, `"1h"`, `"2d"`); a bare number is seconds. Zero is
/// refused.
pub fn parse_duration(s: &str) -> Result<Duration, Invalid> {
    let bad = || {
        Invalid(format!(
            "invalid duration {s:?}: expected a number with an optional unit s, m, h or d (e.g. 3600, 30m, 1h, 2d)"
        ))
    };
    let t = s.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c),
        _ => (t, 's'),
    };
    let scale: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let secs = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| Invalid(format!("duration {s:?} is too large")))?;
    if secs == 0 {
        return Err(Invalid(format!("duration {s:?} must be greater than zero")));
    }
    Ok(Duration::from_secs(secs))
}

/// The fewest bytes a secret may have: 256 bits, the size of the HS256 hash (RFC 7518 asks
/// for no less). Anyone who guesses the secret can forge tokens and download URLs.
pub const MIN_SECRET_BYTES: usize = 32;

/// Reads an HMAC secret from `path`, dropping one trailing newline (`\n` or
/// `\r\n`). An empty secret, or one shorter than [`MIN_SECRET_BYTES`], is an error.
pub fn read_secret_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    let mut secret = std::fs::read(path)
        .with_context(|| format!("cannot read secret file {}", path.display()))?;
    if secret.ends_with(b"\r\n") {
        secret.truncate(secret.len() - 2);
    } else if secret.ends_with(b"\n") {
        secret.truncate(secret.len() - 1);
    }
    let how = format!(
        "make one with `head -c 32 /dev/urandom | base64 > {}`",
        path.display()
    );
    if secret.is_empty() {
        anyhow::bail!("secret file {} is empty ({how})", path.display());
    }
    if secret.len() < MIN_SECRET_BYTES {
        anyhow::bail!(
            "secret file {} holds a secret of {} bytes, too short to sign tokens and URLs with: \
             it needs at least {MIN_SECRET_BYTES} ({how})",
            path.display(),
            secret.len()
        );
    }
    Ok(secret)
}

/// Refuses anything but a three-part token whose header says HS256, with a
/// clearer message than the JWT library gives (it cannot name `none`), and
/// any header with `crit` (the library ignores it).
fn check_header(token: &str) -> Result<(), TokenError> {
    let parts = token.split('.').count();
    if parts != 3 {
        return Err(TokenError::Malformed(format!(
            "expected three dot-separated parts, found {parts}"
        )));
    }
    let encoded = token.split('.').next().unwrap_or_default();
    let raw = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|e| TokenError::Malformed(format!("header is not base64url: {e}")))?;
    let header: Value = serde_json::from_slice(&raw)
        .map_err(|e| TokenError::Malformed(format!("header is not JSON: {e}")))?;
    match header.get("alg") {
        Some(Value::String(alg)) if alg == "HS256" => {}
        Some(Value::String(alg)) => return Err(TokenError::UnsupportedAlgorithm(alg.clone())),
        _ => {
            return Err(TokenError::Malformed(
                "header has no string \"alg\"".to_owned(),
            ));
        }
    }
    if let Some(crit) = header.get("crit") {
        return Err(TokenError::Malformed(format!(
            "header lists critical extensions (\"crit\": {crit}), which roomfs does not support"
        )));
    }
    Ok(())
}

fn iat_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    numeric_date(d, "iat")
}

fn nbf_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    numeric_date(d, "nbf")
}

fn exp_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    numeric_date(d, "exp")
}

/// Reads the JWT NumericDate of a present `claim`: an integer, or a
/// non-negative float rounded down. `null` or another type is an error
/// (an absent claim never gets here: the fields default to `None`).
fn numeric_date<'de, D: Deserializer<'de>>(d: D, claim: &str) -> Result<Option<u64>, D::Error> {
    let v = Value::deserialize(d)?;
    let n = match &v {
        Value::Number(n) => n,
        _ => {
            return Err(serde::de::Error::custom(format!(
                "\"{claim}\" must be a number of seconds since the epoch, found {v}"
            )));
        }
    };
    match (n.as_u64(), n.as_f64()) {
        (Some(secs), _) => Ok(Some(secs)),
        (None, Some(f)) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => Ok(Some(f as u64)),
        _ => Err(serde::de::Error::custom(format!(
            "\"{claim}\" is {n}, not a valid NumericDate"
        ))),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `YYYY-MM-DD hh:mm:ss UTC` for seconds since the epoch.
fn utc_string(secs: u64) -> String {
    // Civil-from-days, after Howard Hinnant's algorithm.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    use super::*;
    use crate::grant::{Access, Denied};

    const SECRET: &[u8] = b"test-secret-0123456789";

    /// Signs `claims` (raw JSON text) as another tool would, without jsonwebtoken.
    fn sign_raw(header: &str, claims: &[u8], secret: &[u8]) -> String {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        sign_message(&message, secret)
    }

    /// Appends an HMAC-SHA256 signature to `header.payload` text.
    fn sign_message(message: &str, secret: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(message.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{message}.{sig}")
    }

    fn hs256(claims: &Value) -> String {
        sign_raw(
            r#"{"alg":"HS256","typ":"JWT"}"#,
            claims.to_string().as_bytes(),
            SECRET,
        )
    }

    fn fixture(name: &str) -> Vec<u8> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/grants/");
        std::fs::read(format!("{dir}{name}")).unwrap()
    }

    #[test]
    fn fixture_agent_inputs_ro_outputs_rw() {
        let token = sign_raw(
            r#"{"alg":"HS256","typ":"JWT"}"#,
            &fixture("agent-inputs-ro-outputs-rw.json"),
            SECRET,
        );
        let v = verify(&token, SECRET).unwrap();
        assert_eq!(v.room.as_deref(), Some("r1"));
        assert_eq!(v.name.as_deref(), Some("analyst-agent"));
        assert_eq!(v.exp, Some(4_102_444_800));
        let g = &v.grant;
        assert_eq!(g.check(b"inputs/a.csv", Access::Read), Ok(()));
        assert_eq!(
            g.check(b"inputs/a.csv", Access::Write),
            Err(Denied::ReadOnly)
        );
        assert_eq!(g.check(b"outputs/r.txt", Access::Write), Ok(()));
        assert_eq!(g.check(b"secret", Access::Read), Err(Denied::Outside));
        assert!(g.shows(b"", b"inputs") && g.shows(b"", b"outputs"));
        assert!(!g.shows(b"", b"secret"));
    }

    #[test]
    fn fixture_full_access() {
        let token = sign_raw(
            r#"{"typ":"JWT","alg":"HS256"}"#,
            &fixture("full-access.json"),
            SECRET,
        );
        let v = verify(&token, SECRET).unwrap();
        assert_eq!(v.room.as_deref(), Some("r1"));
        assert_eq!(v.name.as_deref(), Some("operator"));
        assert!(v.grant.is_full());
        assert_eq!(v.grant.check(b"anything/at/all", Access::Write), Ok(()));
    }

    #[test]
    fn fixture_no_storage() {
        let token = sign_raw(r#"{"alg":"HS256"}"#, &fixture("no-storage.json"), SECRET);
        let v = verify(&token, SECRET).unwrap();
        assert_eq!(v.room.as_deref(), Some("r1"));
        assert_eq!(v.grant, Grant::none());
        assert_eq!(v.grant.check(b"inputs", Access::Read), Err(Denied::Outside));
    }

    #[test]
    fn no_api_grant_or_null_storage_is_no_access() {
        for grants in [
            json!([{ "name": "room", "scope": "r1" }]),
            json!([{ "name": "api", "scope": { "storage": null } }]),
        ] {
            let v = verify(&hs256(&json!({ "name": "a", "grants": grants })), SECRET).unwrap();
            assert_eq!(v.grant, Grant::none());
        }
    }

    #[test]
    fn issue_then_verify_round_trip() {
        let specs = ["inputs/:ro".to_owned(), "outputs/:rw".to_owned()];
        let grant = Grant::parse_cli(&specs).unwrap();
        let token = issue(SECRET, "bob", "r7", &grant, Duration::from_secs(3600)).unwrap();
        let v = verify(&token, SECRET).unwrap();
        assert_eq!(v.room.as_deref(), Some("r7"));
        assert_eq!(v.name.as_deref(), Some("bob"));
        assert_eq!(v.grant, grant);
        let exp = v.exp.unwrap();
        assert!(exp >= now_secs() + 3590 && exp <= now_secs() + 3600);

        for g in [Grant::full(), Grant::none()] {
            let t = issue(SECRET, "x", "r", &g, Duration::from_secs(60)).unwrap();
            assert_eq!(verify(&t, SECRET).unwrap().grant, g);
        }
    }

    #[test]
    fn issued_claims_have_meshagent_shape() {
        let grant = Grant::parse_cli(&["inputs/:ro".to_owned()]).unwrap();
        let token = issue(SECRET, "bob", "r7", &grant, Duration::from_secs(60)).unwrap();
        let payload = token.split('.').nth(1).unwrap();
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(claims["name"], "bob");
        assert!(claims["iat"].is_u64() && claims["exp"].is_u64());
        assert_eq!(
            claims["grants"],
            json!([
                { "name": "room", "scope": "r7" },
                { "name": "api", "scope": { "storage": { "paths": [
                    { "path": "inputs/", "read_only": true }
                ]}}}
            ])
        );
    }

    #[test]
    fn names_and_rooms_that_cannot_be_shown_or_mounted_are_refused() {
        let grant = Grant::full();
        let day = Duration::from_secs(86400);
        for name in ["", "evil\nname", "\u{1b}[31mred", &"n".repeat(201)] {
            let e = issue(SECRET, name, "r1", &grant, day).unwrap_err();
            assert!(matches!(e, TokenError::BadClaim(_)), "{name:?}: {e}");
            let forged = hs256(&json!({ "name": name, "grants": [] }));
            let e = verify(&forged, SECRET).unwrap_err();
            assert!(e.to_string().contains("its name"), "{name:?}: {e}");
        }
        let e = issue(SECRET, "bob", "../r1", &grant, day).unwrap_err();
        assert!(e.to_string().contains("invalid room id"), "{e}");
        let forged = hs256(&json!({
            "name": "bob", "grants": [{ "name": "room", "scope": "../r1" }]
        }));
        assert!(matches!(
            verify(&forged, SECRET),
            Err(TokenError::BadClaim(_))
        ));
        assert!(issue(SECRET, "analyst agent 7", "r1", &grant, day).is_ok());
    }

    #[test]
    fn unknown_claims_are_kept() {
        let claims: TokenClaims = serde_json::from_value(json!({
            "name": "a", "kid": "k1", "version": "0.5", "exp": 1.7e9, "grants": []
        }))
        .unwrap();
        assert_eq!(claims.exp, Some(1_700_000_000));
        assert_eq!(claims.extra["kid"], "k1");
        assert_eq!(claims.extra["version"], "0.5");
    }

    #[test]
    fn bad_signature() {
        let token = hs256(&json!({ "name": "a", "grants": [] }));
        let err = verify(&token, b"another-secret").unwrap_err();
        assert!(matches!(err, TokenError::BadSignature), "{err}");
        assert_eq!(err.to_string(), "token signature does not match the secret");

        // Tampered claims with the original signature.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(json!({ "name": "b", "grants": [] }).to_string());
        let err = verify(&parts.join("."), SECRET).unwrap_err();
        assert!(matches!(err, TokenError::BadSignature), "{err}");
    }

    #[test]
    fn expired() {
        let exp = now_secs() - 10;
        let err = verify(&hs256(&json!({ "exp": exp, "grants": [] })), SECRET).unwrap_err();
        assert!(
            matches!(err, TokenError::Expired { exp: e } if e == exp),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("token expired at 20") && msg.ends_with(&format!("(exp={exp})")),
            "{msg}"
        );

        let err = verify(&hs256(&json!({ "exp": now_secs(), "grants": [] })), SECRET).unwrap_err();
        assert!(matches!(err, TokenError::Expired { .. }), "{err}");

        let future = now_secs() + 60;
        assert!(verify(&hs256(&json!({ "exp": future, "grants": [] })), SECRET).is_ok());
        assert!(verify(&hs256(&json!({ "grants": [] })), SECRET).is_ok());
    }

    #[test]
    fn not_yet_valid() {
        let nbf = now_secs() + 3600;
        let err = verify(&hs256(&json!({ "nbf": nbf, "grants": [] })), SECRET).unwrap_err();
        assert!(matches!(err, TokenError::NotYetValid), "{err}");
        for nbf in [now_secs(), now_secs() - 10] {
            assert!(verify(&hs256(&json!({ "nbf": nbf, "grants": [] })), SECRET).is_ok());
        }
    }

    #[test]
    fn malformed() {
        let good = hs256(&json!({ "grants": [] }));
        let (head, _) = good.split_once('.').unwrap();
        let cases = [
            "".to_owned(),
            "abc".to_owned(),
            "a.b".to_owned(),
            format!("{good}.x"),
            "!!!.e30.sig".to_owned(),
            format!("{}.e30.sig", URL_SAFE_NO_PAD.encode("not json")),
            sign_message(&format!("{head}.%%%"), SECRET),
            format!("{head}.e30.!!!"),
            hs256(&json!({ "name": "a" })),      // no grants
            hs256(&json!({ "grants": "room" })), // grants not a list
            hs256(&json!({ "exp": "soon", "grants": [] })),
            sign_raw(r#"{"alg":"HS256"}"#, b"{not json", SECRET),
            sign_raw(r#"{"typ":"JWT"}"#, b"{}", SECRET),
        ];
        for token in cases {
            let err = verify(&token, SECRET).unwrap_err();
            assert!(matches!(err, TokenError::Malformed(_)), "{token}: {err}");
        }
        let err = verify("a.b", SECRET).unwrap_err().to_string();
        assert_eq!(
            err,
            "token is malformed: expected three dot-separated parts, found 2"
        );
    }

    #[test]
    fn critical_header_extensions_are_refused() {
        // RFC 7515 §4.1.11: a recipient that does not understand a listed
        // extension must reject the token; roomfs understands none.
        let claims = br#"{"grants":[{"name":"room","scope":"r1"}]}"#;
        for header in [
            r#"{"alg":"HS256","crit":["exp"],"exp":1}"#,
            r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
            r#"{"alg":"HS256","crit":[]}"#,
            r#"{"alg":"HS256","crit":"b64"}"#,
            r#"{"alg":"HS256","crit":null}"#,
        ] {
            let err = verify(&sign_raw(header, claims, SECRET), SECRET).unwrap_err();
            assert!(matches!(err, TokenError::Malformed(_)), "{header}: {err}");
            assert!(err.to_string().contains("crit"), "{header}: {err}");
        }
        let err = verify(
            &sign_raw(
                r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
                claims,
                SECRET,
            ),
            SECRET,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "token is malformed: header lists critical extensions (\"crit\": [\"b64\"]), which roomfs does not support"
        );
    }

    #[test]
    fn null_or_non_numeric_dates_are_malformed() {
        // A null or non-numeric `exp` must not read as "never expires".
        for claim in ["exp", "iat", "nbf"] {
            for value in [
                json!(null),
                json!("4102444800"),
                json!(true),
                json!(-1),
                json!([1]),
                json!({}),
            ] {
                let mut claims = json!({ "grants": [{ "name": "room", "scope": "r1" }] });
                claims[claim] = value.clone();
                let err = verify(&hs256(&claims), SECRET).unwrap_err();
                assert!(
                    matches!(&err, TokenError::Malformed(why) if why.contains(claim)),
                    "{claim}={value}: {err}"
                );
            }
        }
        // Numbers, including fractions, are still dates.
        let claims = json!({ "iat": 1.5e9, "nbf": 1_500_000_000, "exp": 4.1e9, "grants": [] });
        assert_eq!(
            verify(&hs256(&claims), SECRET).unwrap().exp,
            Some(4_100_000_000)
        );
    }

    #[test]
    fn several_room_grants_are_ambiguous() {
        for grants in [
            json!([{ "name": "room", "scope": "r1" }, { "name": "room", "scope": "r2" }]),
            json!([{ "name": "room", "scope": "r1" }, { "name": "room", "scope": "r1" }]),
            json!([
                { "name": "room", "scope": "r1" },
                { "name": "api", "scope": { "storage": {} } },
                { "name": "room", "scope": "r2" }
            ]),
        ] {
            let err = verify(&hs256(&json!({ "grants": grants })), SECRET).unwrap_err();
            assert!(matches!(err, TokenError::BadGrant(_)), "{grants}: {err}");
            assert_eq!(
                err.to_string(),
                "token grant is invalid: token has more than one room grant, so its room is ambiguous"
            );
        }
        // One room grant among others still names the room.
        let grants = json!([
            { "name": "api", "scope": { "storage": {} } },
            { "name": "room", "scope": "r1" },
            { "name": "other", "scope": "x" }
        ]);
        let v = verify(&hs256(&json!({ "grants": grants })), SECRET).unwrap();
        assert_eq!(v.room.as_deref(), Some("r1"));
    }

    #[test]
    fn wrong_algorithm() {
        let claims = br#"{"grants":[{"name":"api","scope":{"storage":{}}}]}"#;
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let hs512 = sign_raw(r#"{"alg":"HS512","typ":"JWT"}"#, claims, SECRET);
        let rs256 = sign_raw(r#"{"alg":"RS256","typ":"JWT"}"#, claims, SECRET);
        for (token, alg) in [(none, "none"), (hs512, "HS512"), (rs256, "RS256")] {
            let err = verify(&token, SECRET).unwrap_err();
            assert!(
                matches!(&err, TokenError::UnsupportedAlgorithm(a) if a == alg),
                "{err}"
            );
            assert!(err.to_string().contains("only HS256"), "{err}");
        }
    }

    #[test]
    fn bad_grants() {
        let cases = [
            json!([{ "name": "api", "scope": { "storage": { "paths": [{ "path": "../etc" }] } } }]),
            json!([{ "name": "api", "scope": { "storage": { "paths": "inputs/" } } }]),
            json!([{ "name": "api", "scope": "storage" }]),
            json!([{ "name": "api", "scope": {} }, { "name": "api", "scope": {} }]),
            json!([{ "name": "room", "scope": { "r": 1 } }]),
        ];
        for grants in cases {
            let err = verify(&hs256(&json!({ "grants": grants })), SECRET).unwrap_err();
            assert!(matches!(err, TokenError::BadGrant(_)), "{grants}: {err}");
        }
        let grants =
            json!([{ "name": "api", "scope": { "storage": { "paths": [{ "path": "a/../b" }] } } }]);
        let err = verify(&hs256(&json!({ "grants": grants })), SECRET).unwrap_err();
        assert!(err.to_string().contains("a/../b"), "{err}");
    }

    #[test]
    fn empty_secret_is_refused() {
        let token = hs256(&json!({ "grants": [] }));
        assert!(matches!(verify(&token, b""), Err(TokenError::EmptySecret)));
        let err = issue(b"", "a", "r", &Grant::full(), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, TokenError::EmptySecret));
    }

    #[test]
    fn token_whitespace_is_ignored() {
        let token = format!(" {}\n", hs256(&json!({ "grants": [] })));
        assert!(verify(&token, SECRET).is_ok());
    }

    #[test]
    fn durations() {
        let ok = [
            ("1h", 3600),
            ("30m", 1800),
            ("45s", 45),
            ("2d", 172_800),
            ("3600", 3600),
            (" 10m ", 600),
        ];
        for (s, secs) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_secs(secs)), "{s}");
        }
        for s in [
            "",
            "h",
            "1x",
            "-1h",
            "1.5h",
            "1 h",
            "0",
            "0s",
            "1hh",
            "99999999999999999999d",
        ] {
            let err = parse_duration(s).unwrap_err();
            assert!(err.0.contains(&format!("{s:?}")), "{s}: {err}");
        }
    }

    #[test]
    fn secret_files() {
        let dir = std::env::temp_dir().join(format!("roomfs-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // 32 bytes, the least a secret may have.
        const S: &str = "s3cret-of-thirty-two-bytes-0123a";
        assert_eq!(S.len(), MIN_SECRET_BYTES);
        let cases = [
            ("plain", S.to_owned(), Ok(S.to_owned())),
            ("newline", format!("{S}\n"), Ok(S.to_owned())),
            ("crlf", format!("{S}\r\n"), Ok(S.to_owned())),
            ("two-newlines", format!("{S}\n\n"), Ok(format!("{S}\n"))),
            ("empty", "\n".to_owned(), Err("is empty")),
            ("one-byte", "s\n".to_owned(), Err("of 1 bytes, too short")),
            // 31 bytes, once the newline is dropped.
            (
                "short",
                format!("{}\r\n", &S[1..]),
                Err("of 31 bytes, too short"),
            ),
        ];
        for (name, content, expected) in cases {
            let path = dir.join(name);
            std::fs::write(&path, content).unwrap();
            match expected {
                Ok(e) => assert_eq!(read_secret_file(&path).unwrap(), e.as_bytes(), "{name}"),
                Err(want) => {
                    let err = format!("{:#}", read_secret_file(&path).unwrap_err());
                    assert!(err.contains(want) && err.contains(name), "{err}");
                    // It says how to make a good one.
                    assert!(err.contains("head -c 32 /dev/urandom"), "{err}");
                }
            }
        }
        let missing = dir.join("missing");
        let err = format!("{:#}", read_secret_file(&missing).unwrap_err());
        // What was being done, and why it failed.
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert!(err.contains("No such file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(utc_string(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_string(4_102_444_800), "2100-01-01 00:00:00 UTC");
        assert_eq!(utc_string(951_782_400 + 3661), "2000-02-29 01:01:01 UTC");
    }
}
