//! Output for people: sizes, durations and times in words, aligned tables, and a progress line
//! on a terminal. The CLI prints these by default; `--json` prints the API's answer instead.
//! Nothing here decides anything: it only formats.

use std::io::{IsTerminal, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

/// `bytes` in binary units with the unit said: `512 B`, `1.5 KiB`, `47.7 MiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration in its two largest units: `45s`, `5m 10s`, `2h 5m`, `3d`, `3d 4h`.
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return if d.is_zero() {
            "0s".into()
        } else {
            "<1s".into()
        };
    }
    let parts = [
        (secs / 86_400, "d"),
        (secs / 3600 % 24, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
    ];
    let first = parts.iter().position(|(n, _)| *n > 0).unwrap_or(3);
    let mut out = format!("{}{}", parts[first].0, parts[first].1);
    if let Some((n, unit)) = parts.get(first + 1)
        && *n > 0
    {
        out.push_str(&format!(" {n}{unit}"));
    }
    out
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `at` (Unix ms) relative to `now` (Unix ms): `12s ago`, `in 5m`, `just now`, `in <1s`.
pub fn relative(at: u64, now: u64) -> String {
    if at <= now && now - at < 1000 {
        return "just now".into();
    }
    if at <= now {
        format!("{} ago", duration(Duration::from_millis(now - at)))
    } else {
        format!("in {}", duration(Duration::from_millis(at - now)))
    }
}

/// `at` (Unix ms) as local time, `2025-11-21 10:02:03` (UTC if the zone is unknown).
pub fn local_time(at: u64) -> String {
    let secs = (at / 1000) as libc::time_t;
    // SAFETY: `tm` is plain data that localtime_r fills (or leaves zeroed on failure); both
    // pointers are valid for the call.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&secs, &mut tm).is_null() {
            return format!("@{}", at / 1000);
        }
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// `used / limit`, or `used` alone when there is no limit.
pub fn of(used: String, limit: Option<String>) -> String {
    match limit {
        Some(limit) => format!("{used} / {limit}"),
        None => used,
    }
}

/// How a column is aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table with a header line; columns are separated by two spaces and padded to the widest
/// cell (counted in characters). The last column is not padded, so lines carry no trailing
/// blanks.
#[derive(Debug)]
pub struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Align)]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (as many cells as columns).
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.columns.len());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.columns.iter().map(|(h, _)| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let header: Vec<String> = self.columns.iter().map(|(h, _)| h.to_string()).collect();
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let pad = widths[i] - width(cell);
                let last = i + 1 == row.len();
                if i > 0 {
                    line.push_str("  ");
                }
                match self.columns[i].1 {
                    Align::Right => {
                        line.push_str(&" ".repeat(pad));
                        line.push_str(cell);
                    }
                    Align::Left => {
                        line.push_str(cell);
                        if !last {
                            line.push_str(&" ".repeat(pad));
                        }
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Name/value lines with the values aligned: `name   value`.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

/// Shortens `text` to one line of at most `max` characters, ending in `…` when cut.
pub fn one_line(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    let cut = line.chars().count() > max || text.lines().nth(1).is_some();
    if !cut {
        return line.to_string();
    }
    let kept: String = line.chars().take(max.saturating_sub(1)).collect();
    format!("{kept}…")
}

/// After this long, a call still under way shows a progress line.
pub const PROGRESS_AFTER: Duration = Duration::from_secs(1);

/// Runs `call`; if it takes longer than [`PROGRESS_AFTER`] and stderr is a terminal, shows
/// `label… 3s` on stderr meanwhile (updated, then erased). Nothing is printed otherwise.
pub fn waiting<T>(label: &str, call: impl FnOnce() -> T) -> T {
    let stderr = std::io::stderr();
    if !stderr.is_terminal() {
        return call();
    }
    with_progress(label, PROGRESS_AFTER, Box::new(stderr), call)
}

/// [`waiting`] with its terminal given: the progress line goes to `out` after `after`.
fn with_progress<T>(
    label: &str,
    after: Duration,
    mut out: Box<dyn Write + Send>,
    call: impl FnOnce() -> T,
) -> T {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let label = label.to_string();
    let start = Instant::now();
    let painter = std::thread::spawn(move || {
        let mut shown = false;
        let mut wait = after;
        while let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(wait) {
            let elapsed = duration(Duration::from_secs(start.elapsed().as_secs()));
            // \r and "erase line": the line is rewritten in place.
            let _ = write!(out, "\r\x1b[K{label}… {elapsed}");
            let _ = out.flush();
            shown = true;
            wait = Duration::from_millis(250);
        }
        if shown {
            let _ = write!(out, "\r\x1b[K");
            let _ = out.flush();
        }
    });
    let result = call();
    let _ = done_tx.send(());
    let _ = painter.join();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn sizes_say_their_unit() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1024), "1.0 KiB");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(50_000_000), "47.7 MiB");
        assert_eq!(size((1 << 20) - 1), "1.0 MiB");
        assert_eq!(size(5 << 40), "5.0 TiB");
        assert_eq!(size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn durations_show_two_units_at_most() {
        let s = Duration::from_secs;
        assert_eq!(duration(Duration::ZERO), "0s");
        assert_eq!(duration(Duration::from_millis(300)), "<1s");
        assert_eq!(duration(s(45)), "45s");
        assert_eq!(duration(s(310)), "5m 10s");
        assert_eq!(duration(s(7500)), "2h 5m");
        assert_eq!(duration(s(7200)), "2h");
        assert_eq!(duration(s(3 * 86_400)), "3d");
        assert_eq!(duration(s(3 * 86_400 + 4 * 3600 + 59)), "3d 4h");
        assert_eq!(duration(s(86_400 + 30)), "1d");
    }

    #[test]
    fn times_are_relative_and_local() {
        assert_eq!(relative(10_000, 10_500), "just now");
        assert_eq!(
            relative(10_500, 10_000),
            "in <1s",
            "a time to come is never now"
        );
        assert_eq!(relative(10_000, 22_000), "12s ago");
        assert_eq!(relative(400_000, 100_000), "in 5m");
        let t = local_time(1_763_700_020_000);
        assert_eq!(t.len(), "2025-11-21 04:40:20".len(), "{t}");
        assert!(t.starts_with("2025-11-2"), "{t}");
    }

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(&[
            ("ID", Align::Left),
            ("FILES", Align::Right),
            ("MOUNTS", Align::Left),
        ]);
        t.row(vec!["s1".into(), "4".into(), "/tmp/a".into()]);
        t.row(vec!["session-two".into(), "1200".into(), "".into()]);
        t.row(vec!["é".into(), "7 / 100".into(), "/x".into()]);
        assert_eq!(
            t.render(),
            "ID             FILES  MOUNTS\n\
             s1                 4  /tmp/a\n\
             session-two     1200\n\
             é            7 / 100  /x\n"
        );
        assert_eq!(
            fields(&[("id", "s1".into()), ("last active", "now".into())]),
            "id           s1\nlast active  now\n"
        );
        assert_eq!(one_line("short", 10), "short");
        assert_eq!(one_line("a longer line", 6), "a lon…");
        assert_eq!(one_line("two\nlines", 10), "two…");
    }

    /// A terminal stand-in that keeps what was written.
    #[derive(Clone, Default)]
    struct Screen(Arc<Mutex<Vec<u8>>>);

    impl Write for Screen {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn progress_shows_only_for_slow_calls_and_is_erased() {
        let screen = Screen::default();
        let got = with_progress(
            "exporting",
            Duration::from_millis(50),
            Box::new(screen.clone()),
            || {
                std::thread::sleep(Duration::from_millis(400));
                7
            },
        );
        assert_eq!(got, 7);
        let text = String::from_utf8(screen.0.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("\r\x1b[Kexporting… "), "{text:?}");
        assert!(text.ends_with("\r\x1b[K"), "{text:?}");
        let quick = Screen::default();
        with_progress("x", Duration::from_secs(10), Box::new(quick.clone()), || ());
        assert!(quick.0.lock().unwrap().is_empty());
    }
}
