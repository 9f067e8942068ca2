//! Errors of the storage seam: the errno the mount will report, whether trying again may help,
//! what was being done, and the cause, so the log line that finally reports it says what failed
//! and why (a network timeout, a refused request, a full spool), while the program using the
//! mount gets a precise errno.

use std::fmt;
use std::io;

/// An error of a store operation.
pub struct StoreError {
    errno: i32,
    transient: bool,
    /// The store's answer to the request, whatever the errno (see [`StoreError::answer`]).
    answer: bool,
    /// What was being done (`"commit rooms/r1/a.txt"`); empty when the errno says it all.
    context: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// The result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

impl StoreError {
    /// An error with just an errno (`ENOENT`, `EEXIST`...).
    pub fn errno(errno: i32) -> StoreError {
        StoreError {
            errno,
            transient: false,
            answer: false,
            context: String::new(),
            source: None,
        }
    }

    /// An answer with an errno that can also mean a failure: `ENOSPC` for an extended
    /// attribute too large for the file (no room for it, not a full disk). Not logged as a
    /// failure.
    pub fn answer(errno: i32) -> StoreError {
        StoreError {
            answer: true,
            ..StoreError::errno(errno)
        }
    }

    /// A backend failure reported as `errno`, with its cause.
    pub fn failed(
        errno: i32,
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StoreError {
        StoreError {
            errno,
            transient: false,
            answer: false,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// Marks the error as one a later retry may not meet (a timeout, an unreachable store).
    pub fn transient(mut self) -> StoreError {
        self.transient = true;
        self
    }

    /// Adds what was being done, unless the error already says.
    pub fn context(mut self, what: impl fmt::Display) -> StoreError {
        if self.context.is_empty() {
            self.context = what.to_string();
        }
        self
    }

    /// The errno to report.
    pub fn raw_os_error(&self) -> i32 {
        self.errno
    }

    /// Whether trying again may help.
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// Whether this is a failure worth an operator's attention (the backend failed), rather
    /// than an answer (`ENOENT`, `EEXIST`, `ENOTEMPTY`...).
    pub fn is_failure(&self) -> bool {
        self.transient
            || !self.answer
                && matches!(
                    self.errno,
                    libc::EIO | libc::ENOSPC | libc::EDQUOT | libc::ETIMEDOUT | libc::ENOMEM
                )
    }

    fn errno_text(&self) -> String {
        io::Error::from_raw_os_error(self.errno).to_string()
    }
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> StoreError {
        match e.raw_os_error() {
            Some(errno) if e.get_ref().is_none() => StoreError::errno(errno),
            Some(errno) => StoreError::failed(errno, String::new(), e),
            None => StoreError::failed(libc::EIO, String::new(), e),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.context.is_empty() {
            write!(f, "{}: ", self.context)?;
        }
        match &self.source {
            Some(source) => {
                write!(f, "{source}")?;
                let mut cause = source.source();
                while let Some(c) = cause {
                    write!(f, ": {c}")?;
                    cause = c.source();
                }
                if io::Error::from_raw_os_error(self.errno).to_string() != source.to_string() {
                    write!(f, " ({})", self.errno_text())?;
                }
                Ok(())
            }
            None => write!(f, "{}", self.errno_text()),
        }?;
        if self.transient {
            write!(f, " [transient]")?;
        }
        Ok(())
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_errno_stays_and_the_cause_reaches_the_message() {
        let plain = StoreError::from(io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(plain.raw_os_error(), libc::ENOENT);
        assert!(!plain.is_failure());
        assert!(StoreError::errno(libc::ENOSPC).is_failure());
        assert!(
            !StoreError::answer(libc::ENOSPC).is_failure(),
            "no room for an xattr"
        );
        let timeout = io::Error::new(io::ErrorKind::TimedOut, "no answer in 30 s");
        let e = StoreError::failed(libc::EIO, "commit rooms/r1/a.txt", timeout).transient();
        assert_eq!(e.raw_os_error(), libc::EIO);
        assert!(e.is_transient() && e.is_failure());
        let text = e.to_string();
        assert!(
            text.contains("commit rooms/r1/a.txt")
                && text.contains("no answer in 30 s")
                && text.contains("[transient]"),
            "{text}"
        );
        // Without an errno of its own, an I/O error is EIO and keeps its text.
        let e = StoreError::from(io::Error::other("the spool is gone")).context("write");
        assert_eq!(e.raw_os_error(), libc::EIO);
        assert!(e.to_string().starts_with("write: the spool is gone"), "{e}");
    }
}
