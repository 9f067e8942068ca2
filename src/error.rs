//! Errors of the code around the file system: checking input, mounting, the daemon, the CLI.
//!
//! - A check of input (a space id, a duration, a size, a config value) fails with [`Invalid`]:
//!   its message says what was wrong and what is accepted. It has no cause beneath it.
//! - An operation that fails because something beneath it failed (mount(2), opening the data
//!   dir, reading the config, a request to the daemon) fails with an [`anyhow::Error`] whose
//!   context says what was being done and whose source chain is what failed. Printed with
//!   `{:#}` it is one line, "what: why: why", for the log and the CLI; a caller can still find
//!   an `io::Error` in the chain (`chain()`, `downcast_ref`) to choose an errno or a status.
//!
//! The file system itself answers with errnos ([`crate::errno`]), the stores with
//! [`crate::store::StoreError`] (errno, cause, whether a retry may help).

use std::fmt;

/// Input that was refused: the message says what is wrong and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

impl Invalid {
    /// The message, for an API answer.
    pub fn message(&self) -> &str {
        &self.0
    }
}
