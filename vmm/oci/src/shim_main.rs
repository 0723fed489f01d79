//! `containerd-shim-vmrun-v2`: vmrun's containerd shim (see
//! `vmrun_oci::shim`).

fn main() {
    vmrun_oci::shim::main();
}
