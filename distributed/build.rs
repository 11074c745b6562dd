// Compiles csrc/c10d_shim.cpp against the c10d headers of the libtorch tch links (torch-sys
// exports its lib folder as DEP_TCH_LIBTORCH_LIB). The gloo headers ProcessGroupGloo.hpp needs
// are not in the torch wheel: vendor/gloo holds the 17 it includes (BSD, see vendor/README.md).
// The NCCL part is compiled only where libtorch_cuda and the CUDA + NCCL headers can be found.
include!("../build-support/link_torch.rs");

use std::path::{Path, PathBuf};

fn main() {
    link_torch();
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    println!("cargo:rerun-if-env-changed=SOFTALIGN_CUDA_HEADERS");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB")
            .or_else(|_| std::env::var("LIBTORCH").map(|p| format!("{p}/lib")))
            .expect("the libtorch lib folder (DEP_TCH_LIBTORCH_LIB from torch-sys): source scripts/env.sh"),
    );
    let include = lib.join("../include");
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .file("csrc/c10d_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include("vendor")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .flag_if_supported("-Wno-deprecated-declarations")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-interference-size")
        // Glue code over heavy headers: -O0 compiles fastest and costs nothing at run time.
        .opt_level(0);
    if let Some(dirs) = nccl_includes(&lib) {
        b.define("SOFTALIGN_NCCL", None)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None);
        for d in dirs {
            b.include(d);
        }
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-cfg=softalign_nccl");
    }
    println!("cargo:rustc-check-cfg=cfg(softalign_nccl)");
    b.compile("softalign_c10d");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// The CUDA runtime and NCCL headers from the nvidia-* wheels beside torch, plus crt/ and nv/
/// (nvidia-cuda-crt, nvidia-cuda-cccl), which torch's own wheel does not pull in: found under
/// SOFTALIGN_CUDA_HEADERS (scripts/cuda-headers.sh fills it). None: build gloo only.
fn nccl_includes(lib: &Path) -> Option<Vec<PathBuf>> {
    if !lib.join("libtorch_cuda.so").exists() {
        return None;
    }
    let site = lib.join("../..");
    let cu = site.join("nvidia/cu13/include");
    let nccl = site.join("nvidia/nccl/include");
    let extra = PathBuf::from(std::env::var("SOFTALIGN_CUDA_HEADERS").ok()?);
    let ok = cu.join("cuda_runtime_api.h").exists()
        && nccl.join("nccl.h").exists()
        && extra.join("crt/host_config.h").exists()
        && extra.join("nv/target").exists();
    if !ok {
        println!(
            "cargo:warning=SOFTALIGN_CUDA_HEADERS is set but the CUDA/NCCL headers are incomplete: building without NCCL"
        );
        return None;
    }
    Some(vec![extra, cu, nccl])
}
