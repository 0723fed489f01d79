//! A minimal logger to standard error, for the VMM's binaries (`vmrun-vmm`,
//! `vmrun`): `PROGRAM: error: ...`. `VMRUN_LOG` sets the level (error,
//! warn, info, debug, trace; default info).

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    program: &'static str,
}

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
            eprintln!("{}: {level}{}", self.program, record.args());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger for `program` (the prefix of its lines); once per
/// process, later calls change nothing.
pub fn init(program: &'static str) {
    static LOGGER: std::sync::OnceLock<StderrLogger> = std::sync::OnceLock::new();
    let level = std::env::var("VMRUN_LOG").ok().and_then(|s| s.parse::<LevelFilter>().ok()).unwrap_or(LevelFilter::Info);
    if log::set_logger(LOGGER.get_or_init(|| StderrLogger { program })).is_ok() {
        log::set_max_level(level);
    }
}
