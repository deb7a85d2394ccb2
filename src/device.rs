//! Choosing the device a run computes on (`--device cpu|cuda|cuda:N|auto`).
//!
//! The CUDA build loads NVIDIA's libraries at run time (cudarc's dynamic loading: `libcuda`,
//! `libnvrtc`, `libcublas`, `libcublasLt`, `libcurand`), so the same binary starts on a machine with
//! no GPU. cudarc panics when a library is missing at first use; [`resolve_device`] therefore looks
//! for each library before it creates a CUDA device and reports the one it could not load as an
//! error (`cuda`) or as the reason for running on the CPU (`auto`).

use crate::error::{Error, Result};
use candle_core::Device;

/// A device and, when `auto` fell back to the CPU, why.
#[derive(Debug, Clone)]
pub struct DeviceChoice {
    /// Where the run computes.
    pub device: Device,
    /// Set when `auto` chose the CPU in a CUDA build: the reason, for one line to the user.
    pub fallback: Option<String>,
}

/// Picks the device for `name` (`cpu`, `cuda`, `cuda:N` or `auto`) and prints, once per process,
/// one line to stderr when `auto` falls back to the CPU in a CUDA build. [`resolve_device`] is the
/// same without printing.
pub fn select_device(name: &str) -> Result<Device> {
    static SAID: std::sync::Once = std::sync::Once::new();
    let choice = resolve_device(name)?;
    if let Some(reason) = &choice.fallback {
        SAID.call_once(|| eprintln!("--device auto: running on the CPU ({reason})"));
    }
    Ok(choice.device)
}

/// Picks the device for `name` without printing; `auto` is CUDA device 0 when this is a CUDA
/// build and a GPU with its libraries is present, else the CPU (with the reason in `fallback`).
pub fn resolve_device(name: &str) -> Result<DeviceChoice> {
    let bad = || {
        Error::Config(format!(
            "--device `{name}`: expected cpu, cuda, cuda:N or auto"
        ))
    };
    match name {
        "cpu" => Ok(DeviceChoice {
            device: Device::Cpu,
            fallback: None,
        }),
        "auto" if !cfg!(feature = "cuda") => Ok(DeviceChoice {
            device: Device::Cpu,
            fallback: None,
        }),
        "auto" => Ok(match open_cuda(0) {
            Ok(device) => DeviceChoice {
                device,
                fallback: None,
            },
            Err(reason) => DeviceChoice {
                device: Device::Cpu,
                fallback: Some(reason),
            },
        }),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal = match cuda.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse().map_err(|_| bad())?,
            };
            let device = open_cuda(ordinal)
                .map_err(|reason| Error::Config(format!("--device {name}: {reason}")))?;
            Ok(DeviceChoice {
                device,
                fallback: None,
            })
        }
        _ => Err(bad()),
    }
}

/// CUDA device `ordinal`, or why it cannot be had (for the user: what is missing and what to do).
fn open_cuda(ordinal: usize) -> std::result::Result<Device, String> {
    if !cfg!(feature = "cuda") {
        return Err(
            "this binary was built without CUDA (build with `--features cuda`, see scripts/gpu-build.sh)"
                .into(),
        );
    }
    if let Some(missing) = missing_cuda_library() {
        return Err(missing);
    }
    Device::new_cuda(ordinal).map_err(|e| format!("no usable CUDA device {ordinal}: {e}"))
}

/// The libraries cudarc loads at run time, by the names it asks the dynamic loader for.
const CUDA_LIBRARIES: [(&str, &str); 5] = [
    ("cuda", "the NVIDIA driver"),
    ("nvrtc", "CUDA's run-time compiler"),
    ("cublas", "cuBLAS"),
    ("cublasLt", "cuBLASLt"),
    ("curand", "cuRAND"),
];

/// The file names tried for `lib<name>`: unversioned, then the majors CUDA 9 to 13 ship (cuRAND
/// 10 for CUDA 12 and 13, the driver's `.1`), as cudarc's dynamic loading tries them.
pub fn library_candidates(name: &str) -> Vec<String> {
    std::iter::once(format!("lib{name}.so"))
        .chain(
            ["13", "12", "11", "10", "9", "1"]
                .iter()
                .map(|major| format!("lib{name}.so.{major}")),
        )
        .collect()
}

/// The first CUDA library the dynamic loader cannot open, as a sentence naming it; `None` when all
/// load. On a machine without a GPU this is the driver's `libcuda`.
pub fn missing_cuda_library() -> Option<String> {
    CUDA_LIBRARIES.iter().find_map(|(name, what)| {
        let candidates = library_candidates(name);
        if candidates.iter().any(|file| can_load(file)) {
            return None;
        }
        let hint = if *name == "cuda" {
            "no NVIDIA driver on this machine".to_string()
        } else {
            "put the folder holding it on LD_LIBRARY_PATH (pip's `nvidia/cu13/lib`, or the CUDA toolkit's `lib64`)"
                .to_string()
        };
        Some(format!(
            "cannot load lib{name}.so ({what}; tried {}): {hint}",
            candidates.join(", ")
        ))
    })
}

/// Whether the dynamic loader opens `file` (searching LD_LIBRARY_PATH and the system paths).
fn can_load(file: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(file) else {
        return false;
    };
    // SAFETY: `c` is a valid C string; a handle that opened is closed again at once.
    unsafe {
        let handle = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_errors() {
        assert!(matches!(resolve_device("cpu").unwrap().device, Device::Cpu));
        for bad in ["gpu", "cuda:x", "cudax", ""] {
            let e = resolve_device(bad).unwrap_err().to_string();
            assert!(
                e.contains("expected cpu, cuda, cuda:N or auto"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_library_that_is_not_there_is_not_loadable() {
        assert!(!can_load("libpeft-sft-no-such-library.so"));
        assert!(can_load("libc.so.6"));
        assert_eq!(library_candidates("curand")[0], "libcurand.so");
        assert!(library_candidates("cuda").contains(&"libcuda.so.1".to_string()));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_auto_is_the_cpu_and_cuda_says_how_to_get_it() {
        let auto = resolve_device("auto").unwrap();
        assert!(matches!(auto.device, Device::Cpu) && auto.fallback.is_none());
        let e = resolve_device("cuda:1").unwrap_err().to_string();
        assert!(
            e.contains("--device cuda:1") && e.contains("--features cuda"),
            "{e}"
        );
    }
}
