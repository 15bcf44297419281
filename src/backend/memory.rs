//! Allocation counters shared by every backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Live and peak bytes of a backend's buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes held by live buffers.
    pub allocated: usize,
    /// Highest `allocated` since the last reset.
    pub peak: usize,
    /// Number of buffers handed out so far.
    pub allocations: u64,
    /// Number of device-to-host reads ([`crate::Backend::download`]) so far.
    pub downloads: u64,
}

/// Thread-safe counter a backend's buffers report to (cloned into each buffer,
/// which calls [`MemoryCounter::free`] when dropped).
#[derive(Clone, Debug, Default)]
pub struct MemoryCounter(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    allocated: AtomicUsize,
    peak: AtomicUsize,
    allocations: AtomicU64,
    downloads: AtomicU64,
}

impl MemoryCounter {
    pub fn alloc(&self, bytes: usize) {
        let now = self.0.allocated.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.0.peak.fetch_max(now, Ordering::Relaxed);
        self.0.allocations.fetch_add(1, Ordering::Relaxed);
    }
    /// Counts one device-to-host read (a training step's readbacks are measured with it).
    pub fn download(&self) {
        self.0.downloads.fetch_add(1, Ordering::Relaxed);
    }
    pub fn free(&self, bytes: usize) {
        self.0.allocated.fetch_sub(bytes, Ordering::Relaxed);
    }
    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            allocated: self.0.allocated.load(Ordering::Relaxed),
            peak: self.0.peak.load(Ordering::Relaxed),
            allocations: self.0.allocations.load(Ordering::Relaxed),
            downloads: self.0.downloads.load(Ordering::Relaxed),
        }
    }
    pub fn reset_peak(&self) {
        self.0.peak.store(self.0.allocated.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_tracks_the_high_water_mark_until_reset() {
        let c = MemoryCounter::default();
        c.alloc(100);
        c.alloc(50);
        c.free(100);
        assert_eq!(c.stats(), MemoryStats { allocated: 50, peak: 150, allocations: 2, downloads: 0 });
        c.reset_peak();
        assert_eq!(c.stats().peak, 50);
    }
}
