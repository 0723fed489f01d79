//! The runtime's log: runc's `--log FILE` and `--log-format text|json`.
//!
//! With `--log`, lines are appended to the file, one `write` each (the
//! supervisors append to the same file): `json` lines are
//! `{"level":"error","msg":"...","time":"..."}`, which containerd's shim
//! reads to explain a failure; `text` lines are logrus-style
//! `time="..." level=error msg="..."`. Without `--log`, messages go to
//! standard error as plain lines. `--debug` adds debug messages.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// logrus's text format.
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for Format {
    type Err = crate::error::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(crate::error::Error::LogFormat(s.to_owned())),
        }
    }
}

struct Logger {
    file: Option<Mutex<File>>,
    format: Format,
}

static LOGGER: std::sync::OnceLock<Logger> = std::sync::OnceLock::new();

fn level_name(l: Level) -> &'static str {
    match l {
        Level::Error => "error",
        Level::Warn => "warning",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    }
}

/// One log line as `format` writes it (with its newline).
pub fn line(format: Format, level: Level, msg: &str, time: &str) -> String {
    match format {
        Format::Json => {
            let v = serde_json::json!({ "level": level_name(level), "msg": msg, "time": time });
            format!("{v}\n")
        }
        Format::Text => format!("time={time:?} level={} msg={msg:?}\n", level_name(level)),
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let msg = record.args().to_string();
        match &self.file {
            Some(f) => {
                let text = line(self.format, record.level(), &msg, &crate::time::now(true));
                if let Ok(mut f) = f.lock() {
                    let _ = f.write_all(text.as_bytes());
                }
            }
            None => {
                let prefix = match record.level() {
                    Level::Error => "error: ",
                    Level::Warn => "warning: ",
                    _ => "",
                };
                eprintln!("vmrun-oci: {prefix}{msg}");
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger: appends to `path` if given, else standard error.
/// A file that cannot be opened falls back to standard error (the error is
/// reported there).
pub fn init(path: Option<&Path>, format: Format, debug: bool) {
    let file = path.and_then(|p| match std::fs::OpenOptions::new().create(true).append(true).open(p) {
        Ok(f) => Some(Mutex::new(f)),
        Err(e) => {
            eprintln!("vmrun-oci: warning: cannot open the log file {}: {e}", p.display());
            None
        }
    });
    let logger = LOGGER.get_or_init(|| Logger { file, format });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(if debug { LevelFilter::Debug } else { LevelFilter::Info });
    }
}

/// Whether log lines go to a file (rather than standard error).
pub fn to_file() -> bool {
    LOGGER.get().is_some_and(|l| l.file.is_some())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn json_lines_are_what_containerd_reads() {
        let l = line(Format::Json, Level::Error, "container \"x\" does not exist", "2024-01-01T00:00:00Z");
        assert!(l.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(l.trim()).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "container \"x\" does not exist");
        assert_eq!(v["time"], "2024-01-01T00:00:00Z");
        let t = line(Format::Text, Level::Info, "a \"b\"", "T");
        assert_eq!(t, "time=\"T\" level=info msg=\"a \\\"b\\\"\"\n");
    }

    #[test]
    fn log_formats_parse() {
        assert_eq!("json".parse::<Format>().unwrap(), Format::Json);
        assert_eq!("text".parse::<Format>().unwrap(), Format::Text);
        let e = "xml".parse::<Format>().unwrap_err();
        assert!(matches!(&e, crate::error::Error::LogFormat(f) if f == "xml"), "{e:?}");
        assert!(e.to_string().starts_with("invalid log format \"xml\""), "{e}");
    }
}
