// Shared by every package's build.rs (pulled in with `include!`).
//
// torch-sys links libtorch with the platform's default `--as-needed`, which drops
// libtorch_cuda.so because nothing references it by symbol: CUDA is then silently
// unavailable. We force it in, and set an rpath so binaries and test executables run
// without LD_LIBRARY_PATH. torch-sys (links = "tch") exports its lib folder to direct
// dependents as DEP_TCH_LIBTORCH_LIB.
fn link_torch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .ok()
        .or_else(|| std::env::var("LIBTORCH").ok().map(|p| format!("{p}/lib")));
    let Some(lib) = lib else {
        println!("cargo:warning=libtorch lib folder unknown: binaries will need LD_LIBRARY_PATH");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
