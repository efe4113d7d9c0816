//! A rank's arena: one allocation, made once and kept across steps, in which the memory plan
//! ([`crate::memory`]) gives every intermediate value its offset. The next step places the same
//! values at the same offsets, so a steady-state step allocates nothing and touches no new page.
//! On the host the arena owns its memory and a value placed there is a [`Buffer`] that views
//! its bytes; a device backend allocates the memory itself ([`Arena::on_device`]) and makes its
//! tensors over the [`Lease`]s it is given ([`lease`]).
//!
//! ```text
//! MemoryPlan { slots: offset per value } ─► rank program: per step run, the outputs' places
//!   ─► placing(arena, places, || backend.eval(..)) ─► a kernel's output buffer
//!      (host: Buffer::zeros / Buffer::to_overwrite; device: lease) takes the next place of
//!      its size
//!   ─► a Buffer viewing the arena, or a device tensor over a Lease (its range released when
//!      dropped)
//! ```
//!
//! The plan says which values never live at the same time; the arena does not trust it blindly:
//! it hands out a range only when no live view overlaps it, and a request it cannot serve (a
//! place already taken, a size the plan did not foresee) is a fresh heap buffer, counted as a
//! miss ([`ArenaStats`]). So a plan that disagreed with the rank program would cost memory, never
//! correctness; the tests hold the misses of a steady-state step at zero.

use ferrotron_ir::{DType, ValueId};
use std::alloc::Layout;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Arena memory is aligned for the widest vector loads.
const ALIGN: usize = 64;

/// One allocation that planned values are placed in, its places in bytes.
pub struct Arena {
    memory: Memory,
    bytes: usize,
    /// The live views: first element → one past the last.
    live: Mutex<BTreeMap<usize, usize>>,
    placed: AtomicU64,
    missed: AtomicU64,
}

/// Where an arena's bytes are.
enum Memory {
    /// Host memory the arena allocated.
    Host(NonNull<u8>),
    /// A device's memory, kept by `owner` (the device backend's allocation, freed when the
    /// arena goes): the device address of its first byte.
    Device {
        address: u64,
        _owner: Box<dyn Send + Sync>,
    },
}

// SAFETY: the arena owns its allocation; views of it are handed out only for ranges no live view
// overlaps (`Arena::view`), so no two threads ever hold aliasing mutable access.
unsafe impl Send for Arena {}
// SAFETY: as above; the shared state is behind a mutex and atomics.
unsafe impl Sync for Arena {}

/// An arena's size, and how many of the values offered a place in it got it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ArenaStats {
    /// Its size.
    pub bytes: u64,
    /// Buffers made in the arena.
    pub placed: u64,
    /// Places not taken (no output of that size came, or its range was still in use) and
    /// buffers that fell back to the heap for that reason.
    pub missed: u64,
}

impl Arena {
    /// A host arena of `bytes`, zeroed by the system as it is first touched. `None` when the
    /// allocation fails.
    pub fn new(bytes: u64) -> Option<Arc<Arena>> {
        let bytes = usize::try_from(bytes).ok()?;
        let ptr = if bytes == 0 {
            NonNull::<f32>::dangling().cast()
        } else {
            let layout = Layout::from_size_align(bytes, ALIGN).ok()?;
            // SAFETY: the layout has a non-zero size.
            let raw = unsafe { std::alloc::alloc_zeroed(layout) };
            advise_huge_pages(raw, bytes);
            NonNull::new(raw)?
        };
        Some(Arena::over(Memory::Host(ptr), bytes))
    }

    /// An arena of `bytes` in a device's memory, which starts at device address `address` and
    /// which `owner` keeps allocated as long as the arena lives. The device backend makes its
    /// tensors over the places it leases ([`lease`]); host buffers are never placed in it.
    pub fn on_device(bytes: usize, address: u64, owner: Box<dyn Send + Sync>) -> Arc<Arena> {
        Arena::over(
            Memory::Device {
                address,
                _owner: owner,
            },
            bytes,
        )
    }

    fn over(memory: Memory, bytes: usize) -> Arc<Arena> {
        Arc::new(Arena {
            memory,
            bytes,
            live: Mutex::new(BTreeMap::new()),
            placed: AtomicU64::new(0),
            missed: AtomicU64::new(0),
        })
    }

    /// Whether its memory is a device's ([`Arena::on_device`]).
    pub fn is_on_device(&self) -> bool {
        matches!(self.memory, Memory::Device { .. })
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes as u64
    }

    /// The placements and misses so far.
    pub fn stats(&self) -> ArenaStats {
        ArenaStats {
            bytes: self.bytes(),
            placed: self.placed.load(Ordering::Relaxed),
            missed: self.missed.load(Ordering::Relaxed),
        }
    }

    /// A lease of bytes `start..start + len`, when they lie in the arena and no live lease
    /// overlaps them. Its bytes hold whatever the range last held.
    fn view(self: &Arc<Self>, start: usize, len: usize) -> Option<Lease> {
        let end = start
            .checked_add(len)
            .filter(|&e| e <= self.bytes && len > 0)?;
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > start)
        {
            return None;
        }
        live.insert(start, end);
        Some(Lease {
            arena: self.clone(),
            start,
            len,
        })
    }

    fn release(&self, start: usize) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.remove(&start);
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if let (Memory::Host(ptr), true) = (&self.memory, self.bytes > 0) {
            let layout = Layout::from_size_align(self.bytes, ALIGN).expect("made with it");
            // SAFETY: allocated in `Arena::new` with this layout; no view outlives the arena
            // (each holds an `Arc` of it).
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
        }
    }
}

impl ArenaStats {
    /// What happened between `before` and this (the same arena's).
    pub fn since(self, before: ArenaStats) -> ArenaStats {
        ArenaStats {
            bytes: self.bytes,
            placed: self.placed - before.placed,
            missed: self.missed - before.missed,
        }
    }
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Arena({} bytes, {:?})", self.bytes(), self.stats())
    }
}

/// Marks a large allocation for transparent huge pages before it is touched: 512× fewer page
/// faults on first writes where the kernel's mode is `madvise`. Only a hint.
pub fn advise_huge_pages(ptr: *mut u8, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let at = ptr as usize;
        let (start, end) = ((at + PAGE - 1) & !(PAGE - 1), (at + bytes) & !(PAGE - 1));
        if end > start {
            // SAFETY: an advisory call on whole pages inside memory the caller owns; it changes
            // no contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, bytes);
}

/// A planned place: the offset and the size of a value in the arena, in bytes.
pub type Place = (usize, usize);

/// A memory plan as places in an arena ([`crate::memory::MemoryPlan::placements`], planned with
/// the bytes per element the backend stores each dtype in): where each step's new outputs go. A
/// value made in place needs none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placements {
    /// The arena's size in bytes.
    pub bytes: usize,
    /// Per position in the stage's run ([`crate::memory::MemoryPlan::positions`]: a step of
    /// the program on one micro-batch), the places of the outputs it makes in a new buffer, in
    /// the order it makes them.
    pub outputs: Vec<Vec<Place>>,
    /// The places of the step's inputs, each micro-batch's uploaded before its first forward
    /// step: `(micro-batch, input, place)`.
    pub inputs: Vec<(u32, ValueId, Place)>,
    /// Per position, the place of the scratch it holds while it runs (a fused output layer's).
    pub scratch: Vec<Option<Place>>,
    /// The places of the copies the stage sends after its last step, in the pipeline's order
    /// of tied parameters: each tied gradient it completes, for the first other stage holding
    /// the parameter.
    pub sent_after: Vec<Place>,
}

/// The bytes a backend stores an element of each dtype in: what a rank's [`Placements`] are
/// planned for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElementSizes([u64; 5]);

impl ElementSizes {
    /// `element_bytes` of every dtype.
    pub fn of(element_bytes: &dyn Fn(DType) -> u64) -> ElementSizes {
        use DType::*;
        ElementSizes([F32, BF16, F16, I32, I64].map(element_bytes))
    }
}

/// The places the outputs being made on this thread go to.
struct Pending {
    arena: Arc<Arena>,
    places: Vec<Place>,
}

thread_local! {
    static PENDING: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

/// Runs `f` with `places` in `arena` offered to the buffers it makes on this thread: each
/// [`Buffer::zeros`] or [`Buffer::to_overwrite`] of `n` elements (or [`lease`] of `n` bytes)
/// takes the first offered place of that many bytes that is free. Places not taken count as misses. Calls nest (the inner places
/// apply inside).
pub fn placing<R>(arena: &Arc<Arena>, places: &[Place], f: impl FnOnce() -> R) -> R {
    let before = PENDING.with(|p| {
        p.borrow_mut().replace(Pending {
            arena: arena.clone(),
            places: places.to_vec(),
        })
    });
    // Restored even when `f` panics (a rank's panic is caught and reported).
    struct Restore(Option<Option<Pending>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let before = self.0.take().flatten();
            let left = PENDING.with(|p| std::mem::replace(&mut *p.borrow_mut(), before));
            if let Some(left) = left {
                let unused = left.places.len() as u64;
                left.arena.missed.fetch_add(unused, Ordering::Relaxed);
            }
        }
    }
    let _restore = Restore(Some(before));
    f()
}

/// A buffer of `len` `f32`s at the next place of that size offered on this thread
/// ([`placing`]) in a host arena, if one is offered and free. Its elements hold what the place
/// last held.
pub fn placed(len: usize) -> Option<Buffer> {
    take(len.checked_mul(4)?, false).map(|lease| Buffer {
        storage: Storage::Placed(lease),
    })
}

/// The next place of `bytes` offered on this thread ([`placing`]) in a device's arena
/// ([`Arena::on_device`]), if one is offered and free: the device backend makes its output
/// over it. Its bytes hold what the place last held.
pub fn lease(bytes: usize) -> Option<Lease> {
    take(bytes, true)
}

/// The next offered place of `len` bytes, in an arena on the device or on the host as
/// `on_device` says (a request of the other kind is served elsewhere, taking no place).
fn take(len: usize, on_device: bool) -> Option<Lease> {
    if len == 0 {
        return None;
    }
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let pending = p.as_mut().filter(|p| p.arena.is_on_device() == on_device)?;
        let k = pending.places.iter().position(|&(_, n)| n == len)?;
        let (start, _) = pending.places.remove(k);
        match pending.arena.view(start, len) {
            Some(b) => {
                pending.arena.placed.fetch_add(1, Ordering::Relaxed);
                Some(b)
            }
            None => {
                pending.arena.missed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    })
}

/// A range of an arena's bytes, held by one value and released when dropped.
pub struct Lease {
    arena: Arc<Arena>,
    start: usize,
    len: usize,
}

impl Lease {
    /// Its size in bytes.
    pub fn bytes(&self) -> usize {
        self.len
    }

    /// The device address of its first byte, in a device's arena.
    pub fn device_address(&self) -> Option<u64> {
        match self.arena.memory {
            Memory::Device { address, .. } => Some(address + self.start as u64),
            Memory::Host(_) => None,
        }
    }

    /// Its `f32`s, in a host arena.
    fn host_f32s(&self) -> (*mut f32, usize) {
        match self.arena.memory {
            Memory::Host(ptr) => {
                assert_eq!(self.start % 4, 0, "an f32 place at an unaligned offset");
                // SAFETY: `start + len` lies inside the allocation (`Arena::view`), whose base
                // is aligned for the widest vectors, and `start` is a multiple of 4.
                let first = unsafe { ptr.as_ptr().add(self.start) };
                (first.cast::<f32>(), self.len / 4)
            }
            Memory::Device { .. } => unreachable!("host buffers are placed in host arenas only"),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.arena.release(self.start);
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({}..{})", self.start, self.start + self.len)
    }
}

/// A tensor's elements: its own heap allocation, or a view of a rank's [`Arena`].
pub struct Buffer {
    storage: Storage,
}

enum Storage {
    Heap(Vec<f32>),
    /// A lease of a host arena.
    Placed(Lease),
}

impl Buffer {
    /// `n` zeros: in the arena where a place of that size is offered ([`placing`]), else on the
    /// heap.
    pub fn zeros(n: usize) -> Buffer {
        match placed(n) {
            Some(mut b) => {
                b.fill(0.0);
                b
            }
            None => vec![0.0; n].into(),
        }
    }

    /// `n` elements the caller overwrites, every one: in the arena where a place of that size
    /// is offered (holding what the place last held), else zeros on the heap.
    pub fn to_overwrite(n: usize) -> Buffer {
        placed(n).unwrap_or_else(|| vec![0.0; n].into())
    }

    /// Whether it is a view of an arena.
    pub fn is_placed(&self) -> bool {
        matches!(self.storage, Storage::Placed(_))
    }

    /// The elements as a `Vec` (moved when on the heap, copied from an arena).
    pub fn into_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::Heap(v) => v,
            Storage::Placed(_) => self.to_vec(),
        }
    }
}

impl Buffer {
    /// The elements as a slice.
    pub fn as_slice(&self) -> &[f32] {
        self
    }

    /// The elements as a mutable slice.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        self
    }
}

impl FromIterator<f32> for Buffer {
    fn from_iter<I: IntoIterator<Item = f32>>(iter: I) -> Buffer {
        iter.into_iter().collect::<Vec<f32>>().into()
    }
}

impl IntoIterator for Buffer {
    type Item = f32;
    type IntoIter = std::vec::IntoIter<f32>;

    fn into_iter(self) -> Self::IntoIter {
        self.into_vec().into_iter()
    }
}

impl<'a> IntoIterator for &'a Buffer {
    type Item = &'a f32;
    type IntoIter = std::slice::Iter<'a, f32>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<'a> IntoIterator for &'a mut Buffer {
    type Item = &'a mut f32;
    type IntoIter = std::slice::IterMut<'a, f32>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter_mut()
    }
}

impl PartialEq<Vec<f32>> for Buffer {
    fn eq(&self, other: &Vec<f32>) -> bool {
        **self == **other
    }
}

impl PartialEq<Buffer> for Vec<f32> {
    fn eq(&self, other: &Buffer) -> bool {
        **self == **other
    }
}

impl PartialEq<[f32]> for Buffer {
    fn eq(&self, other: &[f32]) -> bool {
        **self == *other
    }
}

impl PartialEq<&[f32]> for Buffer {
    fn eq(&self, other: &&[f32]) -> bool {
        **self == **other
    }
}

impl<const N: usize> PartialEq<[f32; N]> for Buffer {
    fn eq(&self, other: &[f32; N]) -> bool {
        **self == *other
    }
}

impl From<Vec<f32>> for Buffer {
    fn from(v: Vec<f32>) -> Buffer {
        Buffer {
            storage: Storage::Heap(v),
        }
    }
}

impl std::ops::Deref for Buffer {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match &self.storage {
            Storage::Heap(v) => v,
            // SAFETY: the range lies in the arena, which the view keeps alive, and no other live
            // view overlaps it (`Arena::view`).
            Storage::Placed(p) => unsafe {
                let (first, len) = p.host_f32s();
                std::slice::from_raw_parts(first, len)
            },
        }
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        match &mut self.storage {
            Storage::Heap(v) => v,
            // SAFETY: as for `deref`; `&mut self` makes this the only access to the range.
            Storage::Placed(p) => unsafe {
                let (first, len) = p.host_f32s();
                std::slice::from_raw_parts_mut(first, len)
            },
        }
    }
}

impl Clone for Buffer {
    /// A copy in a buffer of its own: a place offered for that size ([`placing`]: a step whose
    /// output is a copy of its input), else the heap. Never the same range: a placed buffer's
    /// range belongs to its value alone.
    fn clone(&self) -> Buffer {
        let mut b = Buffer::to_overwrite(self.len());
        b.copy_from_slice(self);
        b
    }
}

impl PartialEq for Buffer {
    fn eq(&self, other: &Buffer) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A place of `n` `f32`s at element `at`, in bytes.
    fn f32s(at: usize, n: usize) -> Place {
        (at * 4, n * 4)
    }

    #[test]
    fn offered_places_are_taken_by_size_and_released_when_dropped() {
        let arena = Arena::new(64 * 4).unwrap();
        let (a, b) = placing(&arena, &[f32s(0, 16), f32s(16, 8)], || {
            (Buffer::to_overwrite(8), Buffer::zeros(16))
        });
        assert!(a.is_placed() && b.is_placed());
        let stats = arena.stats();
        assert_eq!((stats.bytes, stats.placed, stats.missed), (256, 2, 0));
        // Overlapping a live view: refused, the buffer comes from the heap.
        let c = placing(&arena, &[f32s(8, 16)], || Buffer::zeros(16));
        assert!(!c.is_placed());
        assert_eq!(arena.stats().missed, 1);
        drop(b);
        let mut d = placing(&arena, &[f32s(0, 16)], || Buffer::zeros(16));
        assert!(d.is_placed());
        d[15] = 3.0;
        assert_eq!(a.len(), 8);
        assert_eq!(d.clone().into_vec()[15], 3.0);
        // A place no buffer of its size took is a miss; outside a scope nothing is placed.
        placing(&arena, &[f32s(40, 4)], || ());
        assert_eq!(arena.stats().missed, 2);
        assert!(!Buffer::zeros(4).is_placed());
    }

    #[test]
    fn a_device_arena_leases_addresses_and_places_no_host_buffer() {
        struct Owner(Arc<AtomicU64>);
        impl Drop for Owner {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let freed = Arc::new(AtomicU64::new(0));
        let arena = Arena::on_device(256, 0x1000, Box::new(Owner(freed.clone())));
        assert!(arena.is_on_device());
        let (host, a, b) = placing(&arena, &[(0, 64), (64, 32)], || {
            // A host buffer is never placed in device memory, and takes no place.
            (Buffer::zeros(16), lease(64), lease(32))
        });
        assert!(!host.is_placed());
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!((a.device_address(), a.bytes()), (Some(0x1000), 64));
        assert_eq!(b.device_address(), Some(0x1000 + 64));
        assert_eq!((arena.stats().placed, arena.stats().missed), (2, 0));
        // A live lease's range is refused; a host arena leases nothing.
        assert!(placing(&arena, &[(16, 32)], || lease(32)).is_none());
        let host_arena = Arena::new(64).unwrap();
        assert!(placing(&host_arena, &[(0, 16)], || lease(16)).is_none());
        drop((a, b));
        drop(arena);
        assert_eq!(
            freed.load(Ordering::Relaxed),
            1,
            "the memory goes with the arena"
        );
    }

    #[test]
    fn writes_through_one_view_are_not_seen_through_another() {
        let arena = Arena::new(32 * 4).unwrap();
        let (mut a, mut b) = placing(&arena, &[f32s(0, 16), f32s(16, 16)], || {
            (Buffer::to_overwrite(16), Buffer::to_overwrite(16))
        });
        a.fill(1.0);
        b.fill(2.0);
        assert!(a.iter().all(|&x| x == 1.0) && b.iter().all(|&x| x == 2.0));
        // A place past the arena's end is refused.
        let c = placing(&arena, &[f32s(30, 4)], || Buffer::zeros(4));
        assert!(!c.is_placed());
    }
}
