//! The guest profile the VMM writes when asked
//! ([`crate::ProcessOptions::profile`]): samples of where the vCPUs were,
//! taken every `interval_us` microseconds of a vCPU thread's CPU time.
//! Each `stats` request on the control socket ends an epoch, so that the
//! samples of a run's phases (which ask for the statistics at their ends)
//! can be told apart: epoch N is what came after the Nth request.

use serde::{Deserialize, Serialize};

/// All samples of one VM's run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// CPU time of a vCPU thread between two samples, in microseconds.
    pub interval_us: u64,
    /// The samples, counted by stack.
    pub samples: Vec<Sample>,
}

/// Samples that found the guest at the same place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// How many samples.
    pub count: u64,
    /// How many `stats` requests the VMM had answered before them.
    #[serde(default)]
    pub epoch: u32,
    /// The guest was in kernel mode.
    pub kernel: bool,
    /// The instruction pointer, then (in kernel mode) the words of the
    /// kernel stack that point into the kernel's image, innermost first:
    /// the return addresses, with some stale words among them.
    pub stack: Vec<u64>,
}
