//! Signed download URLs: a link to one file of a space that works without credentials until
//! it expires (`roomfs url`, `POST /v1/urls`), served by the daemon's optional HTTP listener
//! ([`http`]).
//!
//! A URL names the space, the path, when it expires and how the browser should treat the file
//! (inline or as a download), and carries an HMAC-SHA256 of exactly those, keyed with the
//! daemon's secret (`secret_file`, the one grant tokens are signed with):
//!
//! ```text
//! http://HOST:PORT/v1/files/rooms/r1/outputs/report.pdf?expires=1763700900&disposition=inline&signature=…
//! ```
//!
//! A session's URL also carries when the session was created (`&session=<Unix ms>`, signed
//! too): a session id may be used again once its session ended, and a link made for the old
//! session must not serve the new one's file of the same name. The listener refuses it when
//! the session it knows under that id was created at another time ([`http`]).
//!
//! Nothing else is in it, so it works on every daemon that shares the secret and serves the
//! space, and changing any part of it (another path, a later expiry) breaks the signature. The
//! signed text is length-prefixed, so no two different (space, path) pairs sign alike. This
//! module only signs and checks; it does no I/O.

pub mod http;

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::space::{SpaceId, SpaceKind};

/// How long a URL works unless asked otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);
/// The longest a URL may work.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// How the browser is to treat the file (`Content-Disposition`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    Inline,
    Attachment,
}

impl Disposition {
    fn as_str(self) -> &'static str {
        match self {
            Disposition::Inline => "inline",
            Disposition::Attachment => "attachment",
        }
    }
}

/// What a valid URL grants: one file of one space, until `expires`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub space: SpaceId,
    /// Relative to the space's root; no `.` or `..`, never empty.
    pub path: PathBuf,
    /// Unix seconds.
    pub expires: u64,
    pub disposition: Disposition,
    /// For a session: when the session the URL was made for was created (Unix ms, its
    /// `created_at`), so that it does not serve a later session of the same id. `None` for a
    /// room, or a session the daemon has no record of.
    pub session: Option<u64>,
}

/// Why a URL is refused (all 403: nothing is read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not a URL this module made (a part is missing or malformed).
    Malformed(&'static str),
    /// The signature does not match what the URL says (tampered with, or another secret).
    BadSignature,
    Expired,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Malformed(what) => write!(f, "not a valid download link: {what}"),
            Refused::BadSignature => f.write_str("the link's signature does not match"),
            Refused::Expired => f.write_str("the link has expired"),
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

/// The MAC of a grant (see the module docs for what is signed).
fn mac(secret: &[u8], g: &Grant) -> HmacSha256 {
    // Any key length is accepted by HMAC.
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    let space = g.space.rel_dir();
    let path = g.path.as_os_str().as_bytes();
    m.update(b"roomfs-url-v1\0");
    m.update(&(space.as_os_str().len() as u64).to_be_bytes());
    m.update(space.as_os_str().as_bytes());
    m.update(&(path.len() as u64).to_be_bytes());
    m.update(path);
    m.update(&g.expires.to_be_bytes());
    m.update(g.disposition.as_str().as_bytes());
    // After the disposition (one of two fixed words), so a text with it never equals one
    // without it: room URLs sign as they always did.
    if let Some(created) = g.session {
        m.update(b"\0session");
        m.update(&created.to_be_bytes());
    }
    m
}

/// Checks a path given for a URL: relative, no `.` or `..`, not empty.
pub fn check_path(path: &Path) -> Result<(), &'static str> {
    if path.as_os_str().is_empty() {
        return Err("no path");
    }
    if path
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err("the path must be relative, without . or ..");
    }
    let bytes = path.as_os_str().as_bytes();
    if bytes.contains(&0) || bytes.ends_with(b"/") || bytes.windows(2).any(|w| w == b"//") {
        return Err("the path has an empty segment");
    }
    Ok(())
}

/// Percent-encodes each segment of `path` (everything but unreserved characters).
fn encode_path(path: &Path) -> String {
    let mut out = String::new();
    for (i, seg) in path
        .as_os_str()
        .as_bytes()
        .split(|&b| b == b'/')
        .enumerate()
    {
        if i > 0 {
            out.push('/');
        }
        for &b in seg {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// Decodes `%XX` escapes; `None` for a malformed one.
fn decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let hi = hex(*b.get(i + 1)?)?;
            let lo = hex(*b.get(i + 2)?)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The URL of `g` under `base` (`http://host:port`, no trailing slash needed).
pub fn sign(secret: &[u8], base: &str, g: &Grant) -> String {
    let sig = mac(secret, g).finalize().into_bytes();
    let session = g
        .session
        .map(|created| format!("&session={created}"))
        .unwrap_or_default();
    format!(
        "{}/v1/files/{}/{}/{}?expires={}&disposition={}{session}&signature={}",
        base.trim_end_matches('/'),
        g.space.kind.dir(),
        g.space.id,
        encode_path(&g.path),
        g.expires,
        g.disposition.as_str(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig)
    )
}

/// Checks a request for `/v1/files/<rest>?<query>` (both still percent-encoded) at Unix second
/// `now`: what it grants, or why not.
pub fn verify(secret: &[u8], rest: &str, query: &str, now: u64) -> Result<Grant, Refused> {
    let mut parts = rest.splitn(3, '/');
    let kind = match parts.next() {
        Some("rooms") => SpaceKind::Room,
        Some("sessions") => SpaceKind::Session,
        _ => return Err(Refused::Malformed("no rooms/ or sessions/")),
    };
    let id = parts.next().ok_or(Refused::Malformed("no space"))?;
    let space = SpaceId::new(kind, id).map_err(|_| Refused::Malformed("bad space id"))?;
    let path = decode(parts.next().ok_or(Refused::Malformed("no path"))?)
        .ok_or(Refused::Malformed("bad escape in the path"))?;
    let path = PathBuf::from(OsStr::from_bytes(&path));
    check_path(&path).map_err(Refused::Malformed)?;
    let (mut expires, mut disposition, mut signature, mut session) = (None, None, None, None);
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("expires", v)) => expires = v.parse::<u64>().ok(),
            Some(("session", v)) => {
                session = Some(
                    v.parse::<u64>()
                        .map_err(|_| Refused::Malformed("bad session time"))?,
                )
            }
            Some(("disposition", "inline")) => disposition = Some(Disposition::Inline),
            Some(("disposition", "attachment")) => disposition = Some(Disposition::Attachment),
            Some(("signature", v)) => {
                signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(v)
                    .ok()
            }
            _ => {}
        }
    }
    let g = Grant {
        space,
        path,
        expires: expires.ok_or(Refused::Malformed("no expiry"))?,
        disposition: disposition.ok_or(Refused::Malformed("no disposition"))?,
        session,
    };
    let signature = signature.ok_or(Refused::Malformed("no signature"))?;
    // Compared in constant time.
    mac(secret, &g)
        .verify_slice(&signature)
        .map_err(|_| Refused::BadSignature)?;
    if now >= g.expires {
        return Err(Refused::Expired);
    }
    Ok(g)
}

/// A store that hands out URLs of its own (an S3 store: a presigned GET of the object), for
/// `roomfs url --direct`. The local disk has none: the daemon answers `--direct` for its spaces
/// with 409.
pub trait Presign: Send + Sync {
    /// A URL that GETs `path` until `ttl` has passed, with `disposition` and `file_name` in
    /// its `Content-Disposition` where the store can set it.
    fn presign_get(
        &self,
        path: &Path,
        ttl: Duration,
        disposition: Disposition,
        file_name: &str,
    ) -> io::Result<String>;
}

#[cfg(test)]
mod tests;
