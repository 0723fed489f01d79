//! What a registry or an archive sends: manifests, indexes and image
//! configurations, parsed by the image store, and a registry's
//! `WWW-Authenticate` challenge.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmrun_images::fuzzing::manifest(data);
    vmrun_images::fuzzing::config(data);
    vmrun_images::fuzzing::challenge(data);
});
