//! The threads the CPU kernels (quantized matmuls, attention) share their work out on, and the output
//! buffer their tasks write disjoint parts of.

/// candle's barrier pool: the calling thread works too, and the others spin a while before they
/// sleep, so the ~200 kernels of a decode step do not each pay for waking threads (with rayon they
/// did: a third of a batch-1 step went to the scheduler on 2 vCPUs). candle's own per-row quantized
/// kernels run on the same pool, so no two pools fight over the cores.
pub fn pool() -> &'static candle_core::utils::BarrierPool {
    candle_core::utils::barrier_pool()
}

/// An output buffer shared by parallel tasks, each writing only its own elements.
pub struct OutPtr<T = f32>(*mut T);
// Manual impls: derived ones would require `T: Copy`, but only the pointer is copied.
impl<T> Clone for OutPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for OutPtr<T> {}
// SAFETY: the tasks write disjoint elements (each user says why), and the buffer outlives them.
unsafe impl<T: Send> Send for OutPtr<T> {}
unsafe impl<T: Send> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    pub fn new(out: &mut [T]) -> Self {
        Self(out.as_mut_ptr())
    }

    /// # Safety
    /// `i` must be inside the buffer, and no other task may write it.
    pub unsafe fn at(self, i: usize) -> *mut T {
        unsafe { self.0.add(i) }
    }

    /// # Safety
    /// `at..at + len` must be inside the buffer, and no other task may touch it.
    pub unsafe fn slice<'a>(self, at: usize, len: usize) -> &'a mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}
