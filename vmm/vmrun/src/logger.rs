//! A minimal stderr logger. `VMRUN_LOG` sets the level (error, warn, info,
//! debug, trace; default info).

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            let level = match record.level() {
                Level::Error => "error: ",
                Level::Warn => "warning: ",
                _ => "",
            };
            eprintln!("vmrun: {level}{}", record.args());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger.
pub fn init() {
    let level = std::env::var("VMRUN_LOG")
        .ok()
        .and_then(|s| s.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Info);
    if log::set_logger(&StderrLogger).is_ok() {
        log::set_max_level(level);
    }
}
