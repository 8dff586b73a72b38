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
        "cuda" => open_cuda(ordinal.unwrap_or(0)).map_err(|e| bad(e.to_string())),
        "metal" => Device::new_metal(ordinal.unwrap_or(0)).map_err(|e| bad(e.to_string())),
        "auto" if ordinal.is_none() => Ok(best_available()),
        _ => Err(bad("expected cuda:N, metal, cpu or auto".into())),
    }
}

/// A CUDA device without cudarc's per-allocation event tracking. The events (two created and
/// destroyed per tensor) only order work across streams, and only once a context has several;
/// candle's device uses one stream per thread and Hearth hands tensors across threads only after a
/// device synchronize, so they are pure host overhead on every op.
fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // SAFETY: see above; no tensor exists on this device yet.
        unsafe { d.disable_event_tracking() };
        // candle's older quantized matmuls (weights dequantized to f32), for comparing GGUF
        // accuracy against its integer MMQ/MMVQ kernels (scripts/gguf_check.py).
        if std::env::var("HEARTH_CUDA_DMMV").is_ok_and(|v| v == "1") {
            candle_core::quantized::cuda::set_force_dmmv(true);
        }
    }
    Ok(device)
}

fn best_available() -> Device {
    if cfg!(feature = "cuda") {
        match open_cuda(0) {
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

/// Where a CUDA decode step's device time goes, op by op: CUDA events between the decoder's ops,
/// summed per op name over every profiled step (`HEARTH_CUDA_PROFILE=1`; a developer's tool, off
/// otherwise). `hearth bench` prints the totals. In a decode graph the events are nodes of the graph
/// (see `CapturedProfile`), so its replays are timed without the host in between; eagerly, where
/// the host is slower than the GPU, an op's time includes the GPU's wait for it.
pub struct OpProfile {
    #[cfg(feature = "cuda")]
    marks: Vec<(&'static str, CudaEvent)>,
    #[cfg(feature = "cuda")]
    stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    #[cfg(feature = "cuda")]
    capturing: bool,
}

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::CudaEvent;

/// Milliseconds and step count per op name.
type OpTotals = std::collections::BTreeMap<&'static str, (f64, u64)>;

static OP_TOTALS: std::sync::Mutex<OpTotals> = std::sync::Mutex::new(OpTotals::new());

/// A captured decode graph's profile events; `accumulate` after each replay.
pub struct CapturedProfile {
    #[cfg(feature = "cuda")]
    marks: Vec<(&'static str, CudaEvent)>,
}

impl CapturedProfile {
    /// Adds the last replay's op times to the totals (waits for it).
    pub fn accumulate(&self) {
        #[cfg(feature = "cuda")]
        add_to_totals(&self.marks);
    }
}

#[cfg(feature = "cuda")]
thread_local! {
    static CAPTURED: std::cell::RefCell<Option<Vec<(&'static str, CudaEvent)>>> =
        const { std::cell::RefCell::new(None) };
}

/// The profile events the last captured forward on this thread left (None unless profiling).
pub fn take_captured_profile() -> Option<CapturedProfile> {
    #[cfg(feature = "cuda")]
    return CAPTURED
        .with(|c| c.borrow_mut().take())
        .map(|marks| CapturedProfile { marks });
    #[cfg(not(feature = "cuda"))]
    None
}

#[cfg(feature = "cuda")]
fn add_to_totals(marks: &[(&'static str, CudaEvent)]) {
    let mut totals = OP_TOTALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for w in marks.windows(2) {
        if let Ok(ms) = w[0].1.elapsed_ms(&w[1].1) {
            let t = totals.entry(w[1].0).or_insert((0.0, 0));
            t.0 += f64::from(ms);
            t.1 += 1;
        }
    }
}

impl OpProfile {
    /// A profile of one forward, when asked for, on CUDA (eager, or being captured).
    pub fn start(device: &Device) -> Option<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus;
            static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            let on =
                *ON.get_or_init(|| std::env::var("HEARTH_CUDA_PROFILE").is_ok_and(|v| v == "1"));
            if !on {
                return None;
            }
            let stream = d.cuda_stream();
            let capturing = match stream.capture_status() {
                Ok(CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE) => false,
                Ok(CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE) => true,
                _ => return None,
            };
            let mut p = Self {
                marks: Vec::new(),
                stream,
                capturing,
            };
            p.mark("start");
            return Some(p);
        }
        let _ = device;
        None
    }

    /// The ops queued since the last mark were `name`.
    pub fn mark(&mut self, name: &'static str) {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::cudarc::driver::sys;
            let Ok(ev) = self
                .stream
                .context()
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            else {
                return;
            };
            let recorded = if self.capturing {
                // CU_EVENT_RECORD_EXTERNAL: in a capture, an event record node of the graph (a
                // plain record would only mark a dependency).
                // SAFETY: a live event and stream of the same context.
                let r = unsafe {
                    sys::cuEventRecordWithFlags(ev.cu_event(), self.stream.cu_stream(), 1)
                };
                r == sys::CUresult::CUDA_SUCCESS
            } else {
                ev.record(&self.stream).is_ok()
            };
            if recorded {
                self.marks.push((name, ev));
            }
        }
        let _ = name;
    }

    /// Waits for the step and adds its op times to the totals; in a capture, leaves the events for
    /// the graph (`take_captured_profile`).
    pub fn finish(self) {
        #[cfg(feature = "cuda")]
        if self.capturing {
            CAPTURED.with(|c| *c.borrow_mut() = Some(self.marks));
        } else {
            add_to_totals(&self.marks);
        }
    }
}

/// The profiled ops' totals as a Markdown table (None if nothing was profiled), and resets them.
pub fn take_op_profile() -> Option<String> {
    let mut totals = OP_TOTALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if totals.is_empty() {
        return None;
    }
    let all: f64 = totals.values().map(|t| t.0).sum();
    // Every profiled step marks its embedding once.
    let steps = totals.get("embedding").map_or(1, |t| t.1.max(1));
    let mut rows: Vec<_> = totals.iter().collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    let mut s = format!(
        "{steps} steps, {:.3} ms each\n\n| op | ms per step | times per step | share |\n| --- | --- | --- | --- |\n",
        all / steps as f64
    );
    for (name, (ms, n)) in rows {
        s.push_str(&format!(
            "| {name} | {:.3} | {} | {:.1}% |\n",
            ms / steps as f64,
            n / steps,
            100.0 * ms / all.max(1e-9)
        ));
    }
    totals.clear();
    Some(s)
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
