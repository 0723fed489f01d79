//! COM1: vm-superio's 16550A, its interrupt raised through an irqfd, its
//! output written to the console sink, its input fed from the host.

use std::collections::VecDeque;
use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use crate::{BusDevice, EventFdTrigger};

/// Receive buffer offset (DLAB clear).
const RBR_OFFSET: u64 = 0;
/// Most input bytes held back while the guest's FIFO is full.
pub const MAX_PENDING_INPUT: usize = 64 * 1024;

/// The guest's serial console.
pub struct SerialConsole {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    pending: VecDeque<u8>,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").field("pending", &self.pending.len()).finish()
    }
}

/// The UART's registers and receive FIFO, for a snapshot. Host input not
/// yet in the FIFO is not kept.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialConsole {
    /// A console raising `interrupt` and writing the guest's output to `out`.
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self { serial: Serial::new(interrupt, out), pending: VecDeque::new() }
    }

    /// The state to put in a snapshot.
    pub fn save(&self) -> SerialConsoleState {
        let s = self.serial.state();
        SerialConsoleState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A console in the state `state` (from a snapshot, hence untrusted:
    /// an oversized FIFO is refused).
    pub fn restore(state: &SerialConsoleState, interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(&s, interrupt, NoEvents, out)
            .map_err(|e| std::io::Error::other(format!("serial state: {e:?}")))?;
        Ok(Self { serial, pending: VecDeque::new() })
    }

    /// Queues host input for the guest. Returns how many bytes were accepted
    /// (fewer than offered once [`MAX_PENDING_INPUT`] bytes wait).
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        self.refill_fifo();
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        let n = bytes.len().min(room);
        self.pending.extend(&bytes[..n]);
        self.refill_fifo();
        n
    }

    /// Whether more input would be accepted.
    pub fn wants_input(&self) -> bool {
        self.pending.len() < MAX_PENDING_INPUT
    }

    fn refill_fifo(&mut self) {
        let room = self.serial.fifo_capacity();
        if room == 0 || self.pending.is_empty() {
            return;
        }
        let chunk: Vec<u8> = self.pending.iter().take(room).copied().collect();
        match self.serial.enqueue_raw_bytes(&chunk) {
            Ok(n) => {
                self.pending.drain(..n);
            }
            Err(e) => log::warn!("serial console: cannot queue input: {e:?}"),
        }
    }

    /// Flushes the output sink.
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = self.serial.read(offset as u8);
        if offset == RBR_OFFSET {
            self.refill_fifo();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            log::warn!("serial console: write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn console() -> (SerialConsole, Sink, EventFd) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let c = SerialConsole::new(EventFdTrigger::try_clone(&evt).unwrap(), Box::new(sink.clone()));
        (c, sink, evt)
    }

    #[test]
    fn output_reaches_the_sink() {
        let (mut c, sink, _) = console();
        for b in b"hi\n" {
            c.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn transmit_interrupt_fires_when_enabled() {
        let (mut c, _, evt) = console();
        c.write(1, &[0x02]); // IER: transmitter holding register empty
        c.write(0, b"x");
        assert!(evt.read().unwrap() >= 1);
    }

    #[test]
    fn input_larger_than_the_fifo_is_delivered_in_order() {
        let (mut c, _, _) = console();
        let input: Vec<u8> = (0..200u8).collect();
        assert_eq!(c.queue_input(&input), 200);
        let mut got = Vec::new();
        let mut b = [0u8];
        for _ in 0..200 {
            c.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
    }

    #[test]
    fn pending_input_is_bounded() {
        let (mut c, _, _) = console();
        let big = vec![b'a'; MAX_PENDING_INPUT + 1000];
        let mut total = 0;
        loop {
            let n = c.queue_input(&big);
            if n == 0 {
                break;
            }
            total += n;
        }
        // What waits for a guest that reads nothing: the pending buffer and
        // the UART's 64-byte FIFO, nothing more.
        assert_eq!(total, MAX_PENDING_INPUT + 64);
        assert!(!c.wants_input());
    }

    #[test]
    fn state_round_trips() {
        let (mut c, _, _) = console();
        c.write(1, &[0x02]);
        c.write(7, &[0x5a]);
        c.queue_input(b"abc");
        let state = c.save();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut r = SerialConsole::restore(&state, EventFdTrigger(evt), Box::new(std::io::sink())).unwrap();
        assert_eq!(r.save(), state);
        let mut b = [0u8];
        r.read(0, &mut b);
        assert_eq!(b, [b'a']);
        let bad = SerialConsoleState { in_buffer: vec![0; 65], ..state };
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(SerialConsole::restore(&bad, EventFdTrigger(evt), Box::new(std::io::sink())).is_err());
    }

    #[test]
    fn odd_sized_accesses_are_ignored() {
        let (mut c, sink, _) = console();
        c.write(0, b"ab");
        let mut d = [0u8; 2];
        c.read(5, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        assert!(sink.0.lock().unwrap().is_empty());
    }
}
