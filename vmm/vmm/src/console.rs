//! The sink behind the serial console: the user's output, plus a watcher
//! that notices kernel messages the boot report records; and
//! [`BoundedWriter`], which keeps a console log file from growing without
//! bound.

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

/// The line written once where a bounded console log stops.
pub const TRUNCATION_LINE: &[u8] = b"[vmrun: console output truncated]\n";

/// Passes at most `limit` bytes to `out`; then writes [`TRUNCATION_LINE`]
/// once (on a line of its own) and drops everything after. The file ends
/// at most `limit` + 35 bytes long. It always reports the whole write as
/// done, so the guest's console never stalls on it.
#[derive(Debug)]
pub struct BoundedWriter<W> {
    out: W,
    limit: u64,
    written: u64,
    /// The last byte passed was a newline (or none was).
    at_line_start: bool,
    truncated: bool,
}

impl<W: Write> BoundedWriter<W> {
    /// A writer to `out` that stops after `limit` bytes.
    pub fn new(out: W, limit: u64) -> Self {
        Self { out, limit, written: 0, at_line_start: true, truncated: false }
    }

    /// Whether output was dropped.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    fn truncate(&mut self) -> io::Result<()> {
        self.truncated = true;
        if !self.at_line_start {
            self.out.write_all(b"\n")?;
        }
        self.out.write_all(TRUNCATION_LINE)?;
        self.out.flush()
    }
}

impl<W: Write> Write for BoundedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.truncated || buf.is_empty() {
            return Ok(buf.len());
        }
        let room = usize::try_from(self.limit - self.written).unwrap_or(usize::MAX);
        let n = buf.len().min(room);
        if n > 0 {
            self.out.write_all(&buf[..n])?;
            self.written += n as u64;
            self.at_line_start = buf[n - 1] == b'\n';
        }
        if n < buf.len() {
            self.truncate()?;
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
    fn bounded_writer_stops_at_the_limit_with_one_line() {
        let out = Buf::default();
        let mut w = BoundedWriter::new(out.clone(), 10);
        w.write_all(b"0123456\n").unwrap();
        assert!(!w.truncated());
        // Straddles the bound: the part that fits goes out, the rest is
        // dropped after the line.
        w.write_all(b"89abcdef").unwrap();
        assert!(w.truncated());
        for _ in 0..1000 {
            w.write_all(b"more output\n").unwrap();
        }
        assert_eq!(&*out.0.lock().unwrap(), b"0123456\n89\n[vmrun: console output truncated]\n");
    }

    #[test]
    fn bounded_writer_at_a_line_end_and_byte_by_byte() {
        let out = Buf::default();
        let mut w = BoundedWriter::new(out.clone(), 6);
        for b in b"hello\nworld\n" {
            w.write_all(&[*b]).unwrap();
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hello\n[vmrun: console output truncated]\n");
        // Exactly at the bound is not truncated.
        let out = Buf::default();
        let mut w = BoundedWriter::new(out.clone(), 6);
        w.write_all(b"hello\n").unwrap();
        assert!(!w.truncated());
        assert_eq!(&*out.0.lock().unwrap(), b"hello\n");
    }

    #[test]
    fn a_console_file_is_bounded() {
        let path = std::env::temp_dir().join(format!("vmrun-console-limit-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let mut sink = ConsoleSink::new(Box::new(BoundedWriter::new(file, 4096)), Box::new(|| {}));
        let line = [b'x'; 99];
        for _ in 0..1000 {
            sink.write_all(&line).unwrap();
            sink.write_all(b"\n").unwrap();
        }
        let got = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(got.len(), 4096 + 1 + TRUNCATION_LINE.len());
        assert!(got.ends_with(TRUNCATION_LINE));
        assert_eq!(got.windows(TRUNCATION_LINE.len()).filter(|w| *w == TRUNCATION_LINE).count(), 1);
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
