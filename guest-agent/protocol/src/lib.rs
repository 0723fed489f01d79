//! The protocol between vmrun on the host and its agent in the guest.
//!
//! # Transport
//!
//! One byte stream, host to agent: a Unix socket (the agent running on the
//! host, in tests), or a vsock connection (in a guest; through
//! Firecracker-style hybrid vsock the host first writes `CONNECT <port>\n`
//! on the VMM's Unix socket and reads `OK <port>\n`). Nothing here needs
//! more than `Read + Write`.
//!
//! # Frames
//!
//! Everything travels in [`frame`]s: a 9-byte header (`len: u32 LE`,
//! `kind: u8`, `id: u32 LE`) and at most [`frame::MAX_PAYLOAD`] (1 MiB) of
//! payload. Control payloads are JSON ([`Hello`], [`Request`],
//! [`Response`]); stream data is raw bytes.
//!
//! # Handshake
//!
//! The host sends a `Hello` frame with [`MAGIC`], its [`VERSION`] and
//! [`Entropy`]: fresh random bytes of the host. An agent that is a guest's
//! init mixes them into the guest kernel's pool and reseeds its CRNG
//! before it answers (a VM restored from a snapshot would otherwise share
//! the snapshot's random state with every other VM restored from it), and
//! refuses a hello without them. The agent answers with its own `Hello`.
//! Each side checks the other's with [`check_hello`]: a different version
//! is refused with an error that names both versions, and the agent closes
//! the connection.
//!
//! # Multiplexing
//!
//! After the handshake the connection carries, interleaved:
//! - requests (host to agent) with a host-chosen id, and responses with the
//!   same id, in any order: a `Wait` is answered when the process ends,
//!   while other requests are answered meanwhile;
//! - process streams: `Data` frames with a stream id the host chose when it
//!   started the process ([`Stdio`]), ended by an `Eof` frame. Stdout and
//!   stderr flow agent to host, stdin host to agent; a terminal uses one
//!   stream id both ways.
//!
//! # Flow control
//!
//! Each stream has a window of [`STREAM_WINDOW`] bytes each way: a sender
//! may have at most that many bytes sent and not yet acknowledged; the
//! receiver acknowledges with `Credit` frames as its consumer takes the
//! bytes. So a process whose output the host does not read stalls on its
//! own pipe without holding up the connection, and neither side ever
//! buffers more than a window per stream. A side that receives more than
//! the window allows treats it as a protocol violation.

pub mod frame;
mod linux;
mod message;

pub use linux::*;
pub use message::*;
pub use vmrun_layerdisk::Digest;

/// The magic string in every [`Hello`].
pub const MAGIC: &str = "vmrun-agent";
/// The protocol version; bumped on any incompatible change (2: the host's
/// hello carries entropy, which an agent in a guest requires).
pub const VERSION: u32 = 2;
/// Bytes a stream's sender may have in flight before it gets credit back.
pub const STREAM_WINDOW: u32 = 1 << 20;
/// The vsock port the agent listens on unless told otherwise
/// (`vmrun.port=` on the guest's command line): the host connects there.
pub const AGENT_PORT: u32 = 1024;

/// A refused handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The peer is not a vmrun agent or host.
    #[error("the peer is not a vmrun agent or host (bad hello)")]
    NotVmrun,
    /// The peer speaks another protocol version.
    #[error(
        "protocol version mismatch: this side ({ours_software}) speaks version {ours}, the peer ({theirs_software}) \
         speaks version {theirs}; use an agent initramfs built with the same vmrun"
    )]
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// Our software.
        ours_software: String,
        /// The peer's version.
        theirs: u32,
        /// The peer's software.
        theirs_software: String,
    },
}

/// Checks the peer's hello against ours.
pub fn check_hello(ours: &Hello, theirs: &Hello) -> Result<(), HandshakeError> {
    if theirs.magic != MAGIC {
        return Err(HandshakeError::NotVmrun);
    }
    if theirs.version != ours.version {
        return Err(HandshakeError::VersionMismatch {
            ours: ours.version,
            ours_software: ours.software.clone(),
            theirs: theirs.version,
            theirs_software: theirs.software.chars().take(64).collect(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_accepts_same_version_and_explains_a_mismatch() {
        let host = Hello::ours("vmrun 0.1.0");
        let agent = Hello::ours("vmrun-agent 0.1.0");
        assert_eq!(check_hello(&host, &agent), Ok(()));
        let newer = Hello { version: VERSION + 1, ..agent.clone() };
        let e = check_hello(&host, &newer).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&format!("version {VERSION}")) && msg.contains(&format!("version {}", VERSION + 1)), "{msg}");
        let stranger = Hello { magic: "http".into(), ..agent };
        assert_eq!(check_hello(&host, &stranger), Err(HandshakeError::NotVmrun));
    }

    #[test]
    fn entropy_travels_in_the_hosts_hello_as_hex() {
        let bytes: Vec<u8> = (0..Entropy::LEN as u8).map(|i| i.wrapping_mul(37)).collect();
        let host = Hello::ours("vmrun 0.1.0").with_entropy(Entropy::new(bytes.clone()).unwrap());
        let json = serde_json::to_string(&host).unwrap();
        assert!(json.contains("\"entropy\":\"00254a6f"), "{json}");
        let back: Hello = serde_json::from_str(&json).unwrap();
        assert_eq!(back, host);
        assert_eq!(back.entropy.as_ref().map(Entropy::bytes), Some(&bytes[..]));
        // Its Debug does not show the bytes.
        assert_eq!(format!("{:?}", back.entropy.unwrap()), format!("Entropy({} bytes)", Entropy::LEN));
        // The agent's hello has none, and says nothing of it.
        let agent = Hello::ours("vmrun-agent 0.1.0");
        let json = serde_json::to_string(&agent).unwrap();
        assert!(!json.contains("entropy"), "{json}");
        assert_eq!(serde_json::from_str::<Hello>(&json).unwrap().entropy, None);
    }

    #[test]
    fn the_hosts_clock_travels_in_its_hello() {
        let time = WallClock { secs: 1_765_000_000, nanos: 123_456_789 };
        let host = Hello::ours("vmrun 0.1.0").with_time(time);
        let json = serde_json::to_string(&host).unwrap();
        assert!(json.contains("\"time\":{\"secs\":1765000000,\"nanos\":123456789}"), "{json}");
        assert_eq!(serde_json::from_str::<Hello>(&json).unwrap().time, Some(time));
        assert_eq!(time.since_epoch(), Some(std::time::Duration::new(1_765_000_000, 123_456_789)));
        assert_eq!(WallClock { nanos: 1_000_000_000, ..time }.since_epoch(), None);
        let agent = Hello::ours("vmrun-agent 0.1.0");
        assert!(!serde_json::to_string(&agent).unwrap().contains("time"));
        let now = WallClock::now().since_epoch().unwrap();
        assert!(now > std::time::Duration::from_secs(1_700_000_000), "{now:?}");
    }

    #[test]
    fn bad_entropy_is_refused() {
        let hello = |e: &str| serde_json::from_str::<Hello>(&format!("{{\"magic\":\"vmrun-agent\",\"version\":2,\"software\":\"x\",\"entropy\":{e}}}"));
        assert!(hello(&format!("\"{}\"", "ab".repeat(Entropy::MIN))).is_ok());
        for bad in [
            format!("\"{}\"", "ab".repeat(Entropy::MIN - 1)),
            format!("\"{}\"", "ab".repeat(Entropy::MAX + 1)),
            format!("\"{}a\"", "ab".repeat(Entropy::MIN)),
            format!("\"{}zz\"", "ab".repeat(Entropy::MIN)),
            "\"\"".to_string(),
            "[1,2,3]".to_string(),
            "7".to_string(),
        ] {
            assert!(hello(&bad).is_err(), "{bad}");
        }
        assert_eq!(Entropy::new(vec![0; 3]), Err(EntropyError::Length(3)));
    }
}
