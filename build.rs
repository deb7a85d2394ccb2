//! With the `cuda` feature: compiles `src/ops/cuda/kernels.cu` to PTX with the CUDA compiler
//! (`nvcc` on PATH, or under `CUDA_HOME`/`CUDA_PATH`), for `CUDA_COMPUTE_CAP` (default 80), into
//! `OUT_DIR/kernels.ptx`, which `ops::cuda` embeds. Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let source = "src/ops/cuda/kernels.cu";
    println!("cargo:rerun-if-changed={source}");
    for var in ["CUDA_COMPUTE_CAP", "CUDA_HOME", "CUDA_PATH", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let home = std::env::var_os("CUDA_HOME").or_else(|| std::env::var_os("CUDA_PATH"));
    let nvcc = home
        .as_ref()
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = out.join("kernels.ptx");
    let mut cmd = Command::new(&nvcc);
    cmd.args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(source)
        .arg("-o")
        .arg(&ptx);
    if let Some(h) = &home {
        cmd.arg(format!("-I{}", PathBuf::from(h).join("include").display()));
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "the cuda feature needs the CUDA compiler: could not run {} ({e}); put nvcc on PATH \
             or set CUDA_HOME (scripts/gpu-build.sh installs a pinned one)",
            nvcc.display()
        )
    });
    assert!(status.success(), "nvcc failed on {source} ({status})");
}
