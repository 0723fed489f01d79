//! `containerd-shim-vmrun-v2`: containerd's runc shim, driving `vmrun-oci`
//! as its `runc` (see `vmrun_oci::shim`).

fn main() -> std::process::ExitCode {
    vmrun_oci::shim::main()
}
