// Keep the library mapped once loaded: nginx reloads close the old Lua VM, which
// would dlclose the module and lose the process-wide registry that lets a reload
// keep the shared region (see src/lua/mod.rs).
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
}
