//! With the `cuda` feature, compiles kernels/*.cu to PTX (loaded at run time through cudarc); without it,
//! does nothing, so CPU builds need no CUDA toolkit.
use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["paged_attention", "activation", "norm", "greedy"];

// The kernels' limits, owned by the Rust side (the launchers use the same constants).
#[allow(dead_code)]
mod kernel_limits {
    include!("src/ops/kernel_limits.rs");
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-changed=kernels/common.cuh");
    println!("cargo:rerun-if-changed=src/ops/kernel_limits.rs");
    for k in KERNELS {
        println!("cargo:rerun-if-changed=kernels/{k}.cu");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    for k in KERNELS {
        let out = out_dir.join(format!("{k}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-lineinfo"])
            .arg(format!("-DHEARTH_ATTN_WARPS={}", kernel_limits::ATTN_WARPS))
            .arg(format!(
                "-DHEARTH_ATTN_MAX_PER_LANE={}",
                kernel_limits::ATTN_MAX_PER_LANE
            ))
            .arg(format!(
                "-DHEARTH_NORM_PER_THREAD={}",
                kernel_limits::NORM_PER_THREAD
            ))
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&out)
            .arg(format!("kernels/{k}.cu"))
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on kernels/{k}.cu");
    }
}
