//! The vmrun guest agent.
//!
//! In a guest it is PID 1 ([`init`]): it mounts the basic file systems,
//! reads its settings from the kernel command line ([`settings`]), brings up
//! the network ([`net`]), and serves the host over vsock ([`server`]). On a
//! host it runs as an ordinary process behind a Unix socket, which is how
//! CI tests it.
//!
//! What it serves: unpacking images from the layer disk into container
//! roots ([`unpack`]), and running containers ([`container`],
//! [`process`], [`seccomp`]), each in a cgroup of its own in a guest
//! ([`cgroup`]).

pub mod caps;
pub mod cgroup;
pub mod changes;
pub mod clock;
pub mod container;
pub mod devcg;
pub mod copy;
pub mod exits;
pub mod held;
pub mod init;
pub mod log;
pub mod net;
pub mod paths;
pub mod process;
pub mod release;
pub mod seccomp;
pub mod server;
pub mod settings;
pub mod sys;
pub mod unpack;
pub mod user;
