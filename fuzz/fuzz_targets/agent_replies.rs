//! The host's side of the agent protocol: everything a hostile guest agent
//! can send (hello, responses, stream data, credits, ends of streams) to
//! the client `vmrun run` uses.
//!
//! Run it with `-detect_leaks=0`: the client's reader thread may still hold
//! its buffer when libFuzzer looks for leaks after an input (a false report
//! that does not reproduce on the same input).
#![no_main]

use std::io::Read;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vmrun_agent_client::{Client, Options, StdioMode};

fuzz_target!(|data: &[u8]| {
    let opts = Options {
        handshake_timeout: Duration::from_millis(50),
        request_timeout: Duration::from_millis(20),
        create_timeout: Duration::from_millis(20),
        // Both ways of taking the agent's hello (a restored VM's client
        // sends its requests before the answer): chosen by the input's
        // first byte, which stays part of the input.
        defer_hello: data.first().is_some_and(|b| b & 1 == 1),
    };
    let Ok(client) = Client::handshake(std::io::Cursor::new(data.to_vec()), std::io::sink(), || {}, opts) else { return };
    if let Ok(mut p) = client.start("c", StdioMode::Piped { stdin: true }) {
        if let Some(mut out) = p.stdout.take() {
            let mut buf = [0u8; 4096];
            while matches!(out.read(&mut buf), Ok(n) if n > 0) {}
        }
        let _ = p.wait();
    }
    let _ = client.ping();
    client.close();
});
