//! The compute device, chosen once (`--device` or the config's `device`) and passed down to every model:
//! `cuda:N`, `metal[:N]`, `cpu`, or, when unset, the best one this build and machine have.
use candle_core::Device;

use crate::error::{HearthError, Result};

/// Parse a device name and open it; `None` or `auto` picks CUDA, then Metal, then the CPU.
pub fn select(spec: Option<&str>) -> Result<Device> {
    let spec = spec.map(str::trim).unwrap_or("auto");
    let bad = |why: String| HearthError::InvalidRequest(format!("--device {spec}: {why}"));
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => (
            k,
            Some(
                n.parse::<usize>()
                    .map_err(|_| bad(format!("`{n}` is not a device number")))?,
            ),
        ),
        None => (spec, None),
    };
    match kind {
        "cpu" if ordinal.is_none() => Ok(Device::Cpu),
        "cuda" if !cfg!(feature = "cuda") => Err(bad(
            "this binary was built without CUDA (build it with scripts/build-cuda.sh)".into(),
        )),
        "metal" if !cfg!(feature = "metal") => Err(bad(
            "this binary was built without Metal (cargo build --features metal)".into(),
        )),
        "cuda" => Device::new_cuda(ordinal.unwrap_or(0)).map_err(|e| bad(e.to_string())),
        "metal" => Device::new_metal(ordinal.unwrap_or(0)).map_err(|e| bad(e.to_string())),
        "auto" if ordinal.is_none() => Ok(best_available()),
        _ => Err(bad("expected cuda:N, metal, cpu or auto".into())),
    }
}

fn best_available() -> Device {
    if cfg!(feature = "cuda") {
        match Device::new_cuda(0) {
            Ok(d) => return d,
            Err(e) => tracing::warn!(error = %e, "no usable CUDA device; trying the next"),
        }
    }
    if cfg!(feature = "metal") {
        match Device::new_metal(0) {
            Ok(d) => return d,
            Err(e) => tracing::warn!(error = %e, "no usable Metal device; using the CPU"),
        }
    }
    Device::Cpu
}

/// Free memory of `device` in bytes, if it can be read (on the CPU, MemAvailable).
pub fn free_memory(device: &Device) -> Option<usize> {
    match device {
        Device::Cpu => std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<usize>().ok())
                .map(|kb| kb * 1024)
        }),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free),
        _ => None,
    }
}

/// Times one engine step on the device: CUDA events on a GPU (the queued kernels' time, independent of
/// host-side overhead), wall time elsewhere.
pub struct StepTimer {
    t0: std::time::Instant,
    #[cfg(feature = "cuda")]
    start: Option<(
        std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
        candle_core::cuda_backend::cudarc::driver::CudaEvent,
    )>,
}

#[cfg(feature = "cuda")]
fn timing_event(
    stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
) -> Option<candle_core::cuda_backend::cudarc::driver::CudaEvent> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| tracing::warn!(error = %e, "cannot record a CUDA event; timing on the host"))
        .ok()
}

impl StepTimer {
    pub fn start(device: &Device) -> Self {
        #[cfg(feature = "cuda")]
        let start = match device {
            Device::Cuda(d) => {
                let stream = d.cuda_stream();
                timing_event(&stream).map(|ev| (stream, ev))
            }
            _ => None,
        };
        #[cfg(not(feature = "cuda"))]
        let _ = device;
        Self {
            t0: std::time::Instant::now(),
            #[cfg(feature = "cuda")]
            start,
        }
    }

    /// Device time since `start`; waits for the device to finish the step's work.
    pub fn stop(self) -> std::time::Duration {
        #[cfg(feature = "cuda")]
        if let Some((stream, begin)) = &self.start {
            if let Some(ms) = timing_event(stream).and_then(|end| begin.elapsed_ms(&end).ok()) {
                return std::time::Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3);
            }
        }
        self.t0.elapsed()
    }
}

/// One engine at a time computes on the CPU: engines of several models share its cores, and a
/// forward's wall time (the CPU's device time) counts only its own work when it has them to itself.
/// Running two forwards at once would not finish sooner (each wants every core); it would bill
/// each for the other's time. None on other devices (a GPU queues kernels itself).
pub fn cpu_turn(device: &candle_core::Device) -> Option<std::sync::MutexGuard<'static, ()>> {
    static CPU: std::sync::Mutex<()> = std::sync::Mutex::new(());
    device.is_cpu().then(|| {
        CPU.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unbuilt_backends_say_so() {
        assert!(select(Some("cpu")).unwrap().is_cpu());
        for bad in ["gpu", "cuda:x", "cpu:1", "cuda:-1", ""] {
            let e = select(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("--device"), "{bad}: {e}");
        }
        if !cfg!(feature = "cuda") {
            let e = select(Some("cuda:0")).unwrap_err().to_string();
            assert!(e.contains("built without CUDA"), "{e}");
        }
        // Without a GPU build, the best available device is the CPU.
        if !cfg!(feature = "cuda") && !cfg!(feature = "metal") {
            assert!(select(None).unwrap().is_cpu());
        }
    }
}
