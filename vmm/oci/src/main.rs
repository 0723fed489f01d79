//! `vmrun-oci`: a runc-compatible OCI runtime whose containers run in
//! vmrun microVMs.

fn main() -> std::process::ExitCode {
    vmrun_oci::cli::main()
}
