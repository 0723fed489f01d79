//! The sink behind the serial console: the user's output, plus a watcher
//! that notices kernel messages the boot report records.

use std::io::{self, Write};

/// The message Linux prints as it starts the init process.
pub const RUN_INIT_MESSAGE: &[u8] = b"Run /init as init process";
/// Longest line kept for matching; longer lines are matched on their start.
const MAX_LINE: usize = 256;

/// Called once when the guest's console shows [`RUN_INIT_MESSAGE`].
pub type OnRunInit = Box<dyn FnMut() + Send>;

/// Writes the guest's console output to `out`, watching it line by line.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    on_run_init: Option<OnRunInit>,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink").finish()
    }
}

impl ConsoleSink {
    /// A sink writing to `out` and calling `on_run_init` once.
    pub fn new(out: Box<dyn Write + Send>, on_run_init: OnRunInit) -> Self {
        Self { out, line: Vec::with_capacity(MAX_LINE), on_run_init: Some(on_run_init) }
    }

    fn watch(&mut self, bytes: &[u8]) {
        if self.on_run_init.is_none() {
            return;
        }
        for &b in bytes {
            if b == b'\n' {
                let found = self.line.windows(RUN_INIT_MESSAGE.len()).any(|w| w == RUN_INIT_MESSAGE);
                self.line.clear();
                if found {
                    if let Some(mut f) = self.on_run_init.take() {
                        f();
                    }
                    return;
                }
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.watch(buf);
        // The guest's output must not be lost to a short write, nor stop the
        // guest if the user's terminal went away.
        if let Err(e) = self.out.write_all(buf) {
            log::debug!("console output dropped: {e}");
        }
        // One byte at a time comes from the UART; flush at line ends.
        if buf.contains(&b'\n') {
            let _ = self.out.flush();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn passes_output_and_fires_once_per_boot() {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let out = Buf::default();
        let mut sink = ConsoleSink::new(Box::new(out.clone()), Box::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        }));
        let text = b"[    1.0] Freeing unused kernel memory\n[   40.2] Run /init as init process\nhello\nRun /init as init process\n";
        for b in text {
            sink.write_all(&[*b]).unwrap();
        }
        assert_eq!(&*out.0.lock().unwrap(), text);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_partial_line_does_not_fire() {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let mut sink = ConsoleSink::new(Box::new(io::sink()), Box::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        }));
        sink.write_all(b"Run /init as init").unwrap();
        sink.write_all(b"\nprocess\n").unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    }
}
