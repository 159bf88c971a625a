//! The caching device allocator and the typed device buffers built on it.
//!
//! A training step allocates and frees the same sizes every iteration; `cuMemAlloc` and
//! `cuMemFree` synchronise the device and cost tens of microseconds, and a step whose every
//! allocation goes to the driver cannot be captured as a CUDA graph. So freed blocks are kept in
//! free lists keyed by a size class and handed out again: after the first step, a steady-state
//! step makes no driver allocation at all (the GPU check asserts this through [`AllocStats`]).
//!
//! Size classes: requests are rounded up to 512 bytes below 1 MiB, and above that to a quarter
//! of the power of two below them (1.25, 1.5, 1.75, 2 MiB, 2.5 MiB, ...), so a block never wastes
//! more than 25 % and the number of classes stays small. A request takes only a block of exactly
//! its class (no splitting), which keeps the bookkeeping trivial and is what a fixed training
//! graph needs. When the driver is out of memory, the cache is released and the request retried
//! once.
//!
//! Stream safety: every buffer is used on the one compute stream of its [`super::Gpu`]. A block
//! returned to the pool while kernels queued on that stream still read it is safe to hand out
//! again, because whatever the next owner queues runs after them on the same stream (the rule
//! PyTorch's caching allocator relies on too). Work on another stream must synchronise with the
//! compute stream before it frees a buffer it used.
//!
//! The pool is generic over its [`Backing`] so that its bookkeeping is tested on the CPU with a
//! fake backing; the GPU backing allocates `cudarc` slices on the compute stream.

use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceRepr};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};

/// Smallest block (and the granularity below [`LARGE`]): 512 bytes keeps every block aligned for
/// 16-byte vector loads and for cuBLASLt/cuDNN's alignment wishes.
pub const MIN_BLOCK: usize = 512;
/// Requests from this size up are rounded to quarter powers of two.
pub const LARGE: usize = 1 << 20;

/// The size class (block size in bytes) a request of `bytes` is served from.
pub fn size_class(bytes: usize) -> usize {
    let b = bytes.max(1);
    if b < LARGE {
        b.div_ceil(MIN_BLOCK) * MIN_BLOCK
    } else {
        let p = 1usize << (usize::BITS - 1 - b.leading_zeros());
        let step = p / 4;
        b.div_ceil(step) * step
    }
}

/// Counters of the allocator, in bytes of size classes (what the device actually holds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Bytes in blocks currently handed out.
    pub in_use: usize,
    /// Highest `in_use` so far.
    pub peak_in_use: usize,
    /// Bytes obtained from the driver and not yet released (in use + cached).
    pub reserved: usize,
    /// Bytes in cached (free) blocks.
    pub cached: usize,
    /// Requests served from the cache.
    pub hits: u64,
    /// Requests that went to the driver (a steady-state step has none).
    pub misses: u64,
}

/// Where the pool's blocks come from.
pub trait Backing {
    /// One allocation of the backing.
    type Block;
    /// A fresh block of exactly `bytes` bytes.
    fn alloc(&self, bytes: usize) -> Result<Self::Block>;
    /// The block's address (device pointer), used as a kernel argument.
    fn address(block: &Self::Block) -> u64;
}

/// The free lists and counters, behind one lock.
struct State<Blk> {
    free: HashMap<usize, Vec<Blk>>,
    stats: AllocStats,
}

/// A caching pool of blocks from a [`Backing`].
pub struct Pool<B: Backing> {
    backing: B,
    state: Mutex<State<B::Block>>,
}

impl<B: Backing> Pool<B> {
    /// An empty pool.
    pub fn new(backing: B) -> Arc<Self> {
        Arc::new(Pool {
            backing,
            state: Mutex::new(State {
                free: HashMap::new(),
                stats: AllocStats::default(),
            }),
        })
    }

    /// The lock (a poisoned lock only means another thread panicked mid-update of counters:
    /// the free lists are still valid, so keep going).
    fn lock(&self) -> MutexGuard<'_, State<B::Block>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A block of at least `bytes` bytes: a cached one of the same class, else a new one.
    pub fn take(self: &Arc<Self>, bytes: usize) -> Result<Lease<B>> {
        let class = size_class(bytes);
        {
            let mut st = self.lock();
            if let Some(block) = st.free.get_mut(&class).and_then(|v| v.pop()) {
                st.stats.hits += 1;
                st.stats.cached -= class;
                st.stats.in_use += class;
                st.stats.peak_in_use = st.stats.peak_in_use.max(st.stats.in_use);
                return Ok(self.lease(block, class));
            }
        }
        let block = match self.backing.alloc(class) {
            Ok(b) => b,
            Err(first) => {
                // Out of memory (or another failure): give the cache back and retry once.
                if self.trim() == 0 {
                    return Err(first);
                }
                self.backing.alloc(class)?
            }
        };
        let mut st = self.lock();
        st.stats.misses += 1;
        st.stats.reserved += class;
        st.stats.in_use += class;
        st.stats.peak_in_use = st.stats.peak_in_use.max(st.stats.in_use);
        drop(st);
        Ok(self.lease(block, class))
    }

    fn lease(self: &Arc<Self>, block: B::Block, class: usize) -> Lease<B> {
        Lease {
            address: B::address(&block),
            block: Some(block),
            class,
            pool: Arc::clone(self),
        }
    }

    /// Releases every cached block to the backing; returns the bytes released.
    pub fn trim(&self) -> usize {
        let (freed, blocks): (usize, Vec<B::Block>) = {
            let mut st = self.lock();
            let freed = st.stats.cached;
            st.stats.reserved -= freed;
            st.stats.cached = 0;
            (freed, st.free.drain().flat_map(|(_, v)| v).collect())
        };
        // Dropping the blocks (outside the lock) hands them back to the driver.
        drop(blocks);
        freed
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> AllocStats {
        self.lock().stats
    }

    /// Returns a block to its free list.
    fn give_back(&self, class: usize, block: B::Block) {
        let mut st = self.lock();
        st.stats.in_use -= class;
        st.stats.cached += class;
        st.free.entry(class).or_default().push(block);
    }
}

/// A block on loan from a [`Pool`]; it goes back to the pool's free list when dropped.
pub struct Lease<B: Backing> {
    block: Option<B::Block>,
    address: u64,
    class: usize,
    pool: Arc<Pool<B>>,
}

impl<B: Backing> Lease<B> {
    /// Size of the block in bytes (the size class, ≥ the request).
    pub fn capacity(&self) -> usize {
        self.class
    }

    /// The block's address.
    pub fn address(&self) -> u64 {
        self.address
    }

    /// The block itself.
    fn block(&self) -> &B::Block {
        // Only `drop` takes the block out; a live lease always holds it.
        self.block
            .as_ref()
            .unwrap_or_else(|| unreachable!("lease without block"))
    }

    fn block_mut(&mut self) -> &mut B::Block {
        self.block
            .as_mut()
            .unwrap_or_else(|| unreachable!("lease without block"))
    }
}

impl<B: Backing> Drop for Lease<B> {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            self.pool.give_back(self.class, b);
        }
    }
}

/// The GPU backing: device memory allocated on the compute stream.
pub struct StreamBacking(pub Arc<CudaStream>);

impl Backing for StreamBacking {
    type Block = CudaSlice<u8>;

    fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: the memory is uninitialised bytes; every typed use writes before it reads
        // (uploads, kernels with full coverage) or zeroes explicitly.
        unsafe { self.0.alloc::<u8>(bytes) }.map_err(|e| {
            Error::invalid(
                "cuda alloc",
                format!("cannot allocate {bytes} bytes of device memory: {e:?}"),
            )
        })
    }

    fn address(block: &CudaSlice<u8>) -> u64 {
        let (ptr, _sync) = block.device_ptr(block.stream());
        ptr
    }
}

/// The device pool type of a [`super::Gpu`].
pub type DevicePool = Pool<StreamBacking>;

/// A typed device buffer of `len` elements of `T`, on loan from the caching allocator.
///
/// It hands out `cudarc` views (for cuBLASLt/cuDNN/memcpy) and its raw address (for kernel
/// arguments). Dropping it returns the memory to the cache, not to the driver.
pub struct DeviceBuffer<T> {
    lease: Lease<StreamBacking>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: DeviceRepr> DeviceBuffer<T> {
    /// An uninitialised buffer of `len` elements from `pool`.
    pub fn new(pool: &Arc<DevicePool>, len: usize) -> Result<Self> {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| {
            Error::invalid(
                "cuda alloc",
                format!("{len} elements overflow the address space"),
            )
        })?;
        Ok(DeviceBuffer {
            lease: pool.take(bytes)?,
            len,
            _t: PhantomData,
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size in bytes of the elements (not of the block).
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// The device address of element 0 (a kernel argument: push `&buf.ptr()`-style values).
    pub fn ptr(&self) -> u64 {
        self.lease.address()
    }

    /// A read-only `cudarc` view of the elements.
    pub fn view(&self) -> CudaView<'_, T> {
        // SAFETY: the block holds at least len * size_of::<T>() bytes (its size class), and T is
        // a plain device type (`DeviceRepr`); the view cannot outlive the buffer.
        unsafe { self.lease.block().transmute::<T>(self.len) }
            .unwrap_or_else(|| unreachable!("size class smaller than the request"))
    }

    /// A writable `cudarc` view of the elements.
    pub fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        let len = self.len;
        // SAFETY: as in `view`.
        unsafe { self.lease.block_mut().transmute_mut::<T>(len) }
            .unwrap_or_else(|| unreachable!("size class smaller than the request"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A backing that hands out numbered fake blocks and can be told to fail.
    struct Fake {
        next: Cell<u64>,
        fail_above: Cell<usize>,
    }

    impl Backing for Fake {
        type Block = (u64, usize);
        fn alloc(&self, bytes: usize) -> Result<(u64, usize)> {
            if bytes > self.fail_above.get() {
                return Err(Error::invalid("fake", "out of memory"));
            }
            let id = self.next.get();
            self.next.set(id + 1);
            Ok((id, bytes))
        }
        fn address(b: &(u64, usize)) -> u64 {
            b.0
        }
    }

    fn pool() -> Arc<Pool<Fake>> {
        Pool::new(Fake {
            next: Cell::new(1),
            fail_above: Cell::new(usize::MAX),
        })
    }

    #[test]
    fn size_classes_round_up_with_bounded_waste() {
        assert_eq!(size_class(0), 512);
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(512), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(LARGE), LARGE);
        assert_eq!(size_class(LARGE + 1), LARGE + LARGE / 4);
        assert_eq!(size_class(3 << 20), 3 << 20);
        assert_eq!(size_class((3 << 20) + 5), 7 << 19);
        for b in [
            1usize,
            700,
            4095,
            1 << 20,
            (1 << 20) + 1,
            5_000_000,
            123_456_789,
        ] {
            let c = size_class(b);
            assert!(c >= b, "{b} -> {c}");
            if b >= LARGE {
                assert!((c - b) * 4 <= c, "{b} -> {c} wastes more than 25%");
            }
        }
    }

    #[test]
    fn freed_blocks_are_reused_and_counted() {
        let p = pool();
        let a = p.take(1000).unwrap();
        let b = p.take(3000).unwrap();
        assert_eq!((a.capacity(), b.capacity()), (1024, 3072));
        let s = p.stats();
        assert_eq!(
            (s.misses, s.hits, s.in_use, s.reserved, s.cached),
            (2, 0, 4096, 4096, 0)
        );
        let a_addr = a.address();
        drop(a);
        let s = p.stats();
        assert_eq!((s.in_use, s.cached, s.reserved), (3072, 1024, 4096));
        // Same class -> the very block that was freed; another class -> a new block.
        let c = p.take(600).unwrap();
        assert_eq!(c.address(), a_addr);
        let d = p.take(100).unwrap();
        assert_ne!(d.address(), a_addr);
        let s = p.stats();
        assert_eq!((s.hits, s.misses), (1, 3));
        assert_eq!(s.peak_in_use, 3072 + 1024 + 512);
        drop((b, c, d));
        let s = p.stats();
        assert_eq!((s.in_use, s.cached), (0, s.reserved));
    }

    #[test]
    fn a_steady_state_loop_makes_no_new_allocations() {
        let p = pool();
        let step = |p: &Arc<Pool<Fake>>| {
            let x = p.take(1 << 22).unwrap();
            let y = p.take(12345).unwrap();
            let z = p.take(1 << 22).unwrap();
            drop(y);
            let w = p.take(12000).unwrap(); // same class as y
            drop((x, z, w));
        };
        step(&p);
        let after_first = p.stats();
        for _ in 0..5 {
            step(&p);
        }
        let s = p.stats();
        assert_eq!(
            s.misses, after_first.misses,
            "steady state went to the driver"
        );
        assert_eq!(s.reserved, after_first.reserved);
        assert_eq!(s.hits, after_first.hits + 5 * 4);
    }

    #[test]
    fn trim_releases_cache_and_oom_retries_after_trim() {
        let p = pool();
        let a = p.take(1 << 21).unwrap();
        drop(a);
        assert_eq!(p.stats().cached, 1 << 21);
        // Now the backing refuses anything above 1 MiB: the request must fail, after trimming.
        p.backing.fail_above.set(1 << 20);
        assert!(p.take(3 << 20).is_err());
        assert_eq!(
            p.stats().cached,
            0,
            "the failed request should have released the cache"
        );
        assert_eq!(p.stats().reserved, 0);
        p.backing.fail_above.set(usize::MAX);
        let b = p.take(1 << 21).unwrap();
        drop(b);
        assert!(p.trim() > 0);
        assert_eq!(p.stats().cached, 0);
        assert_eq!(p.trim(), 0);
    }
}
