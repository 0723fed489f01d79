//! Frames: the unit on the wire.
//!
//! A frame is a 9-byte header, `len: u32 LE | kind: u8 | id: u32 LE`, then
//! `len` bytes of payload (at most [`MAX_PAYLOAD`]). A frame whose header
//! announces more is refused before anything is allocated for it.

use std::io::{self, Read};

/// Size of a frame header.
pub const HEADER_LEN: usize = 9;
/// The largest payload a frame may carry (both directions).
pub const MAX_PAYLOAD: usize = 1 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// JSON [`crate::Hello`]; the first frame each way, id 0.
    Hello = 1,
    /// JSON [`crate::Request`]; id: the request id, chosen by the host.
    Request = 2,
    /// JSON [`crate::Response`]; id: the request it answers.
    Response = 3,
    /// Raw bytes of a stream (1 to [`MAX_PAYLOAD`]); id: the stream.
    Data = 4,
    /// The stream's sender is done (empty payload); id: the stream.
    Eof = 5,
    /// The receiver of a stream grants its sender more bytes (u32 LE);
    /// id: the stream.
    Credit = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Hello,
            2 => Self::Request,
            3 => Self::Response,
            4 => Self::Data,
            5 => Self::Eof,
            6 => Self::Credit,
            _ => return None,
        })
    }
}

/// Errors reading frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The header announces a payload over the limit.
    #[error("frame of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge(u32),
    /// The header has an unknown kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// Reading failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it carries.
    pub kind: Kind,
    /// Request or stream id.
    pub id: u32,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Appends one frame to `buf` (so a frame goes out in one `write`).
///
/// # Panics
/// Panics if `payload` is over [`MAX_PAYLOAD`]: senders chunk their data.
pub fn encode_into(buf: &mut Vec<u8>, kind: Kind, id: u32, payload: &[u8]) {
    assert!(payload.len() <= MAX_PAYLOAD, "frame payload over the limit");
    buf.reserve(HEADER_LEN + payload.len());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.push(kind as u8);
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// One frame as bytes.
pub fn encode(kind: Kind, id: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_into(&mut v, kind, id, payload);
    v
}

fn parse_header(h: &[u8]) -> Result<(usize, Kind, u32), FrameError> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if len as usize > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(len));
    }
    let kind = Kind::from_u8(h[4]).ok_or(FrameError::UnknownKind(h[4]))?;
    let id = u32::from_le_bytes([h[5], h[6], h[7], h[8]]);
    Ok((len as usize, kind, id))
}

/// Reads one frame from a blocking reader (wrap it in a `BufReader`).
/// `Ok(None)` is a clean end of stream between frames.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (len, kind, id) = parse_header(&h)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(Some(Frame { kind, id, payload }))
}

/// Cuts frames out of bytes as they arrive (for non-blocking readers).
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
}

impl Decoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the connection.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered that do not yet make a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_LEN {
            self.compact();
            return Ok(None);
        }
        let (len, kind, id) = parse_header(&avail[..HEADER_LEN])?;
        if avail.len() < HEADER_LEN + len {
            self.compact();
            return Ok(None);
        }
        let payload = avail[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.start += HEADER_LEN + len;
        Ok(Some(Frame { kind, id, payload }))
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_blocking_and_incremental() {
        let mut wire = Vec::new();
        encode_into(&mut wire, Kind::Request, 7, b"{\"op\":\"ping\"}");
        encode_into(&mut wire, Kind::Data, 3, &[0u8; 1000]);
        encode_into(&mut wire, Kind::Eof, 3, b"");
        let mut r = &wire[..];
        let a = read_frame(&mut r).unwrap().unwrap();
        assert_eq!((a.kind, a.id, a.payload.as_slice()), (Kind::Request, 7, &b"{\"op\":\"ping\"}"[..]));
        assert_eq!(read_frame(&mut r).unwrap().unwrap().payload.len(), 1000);
        assert_eq!(read_frame(&mut r).unwrap().unwrap().kind, Kind::Eof);
        assert!(read_frame(&mut r).unwrap().is_none());

        // Byte by byte through the decoder.
        let mut d = Decoder::new();
        let mut frames = Vec::new();
        for b in &wire {
            d.feed(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[1].id, 3);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn oversized_and_unknown_frames_are_refused() {
        let mut h = Vec::new();
        h.extend_from_slice(&((MAX_PAYLOAD as u32) + 1).to_le_bytes());
        h.push(Kind::Data as u8);
        h.extend_from_slice(&1u32.to_le_bytes());
        assert!(matches!(read_frame(&mut &h[..]), Err(FrameError::TooLarge(_))));
        let mut d = Decoder::new();
        d.feed(&h);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge(_))));

        let mut u = encode(Kind::Data, 1, b"x");
        u[4] = 99;
        assert!(matches!(read_frame(&mut &u[..]), Err(FrameError::UnknownKind(99))));
    }

    #[test]
    fn truncated_frames_are_errors() {
        let f = encode(Kind::Data, 1, b"hello");
        for cut in 1..f.len() {
            assert!(matches!(read_frame(&mut &f[..cut]), Err(FrameError::Truncated)), "cut at {cut}");
        }
    }
}
