//! Reads stream: memory is bounded by the page size, not by the stream or
//! store length. A counting global allocator measures the peak of live heap
//! bytes while 100k events are read, for every backend. (One test in this
//! binary, so no other test's allocations are counted.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use aftermath::store::{read_all_pages, read_stream_all};
use aftermath::{Direction, EventStore, ExpectedVersion, MemoryStore, Position, SqliteStore};
use futures::TryStreamExt;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const EVENTS: u64 = 100_000;
const PAGE: usize = 1_000;
/// 100k events of ~200 bytes each are ~40 MB as `StoredEvent`s; a page is
/// well under 1 MB. Buffering the whole stream would exceed this bound.
const BOUND: usize = 8 * 1024 * 1024;

async fn fill<S: EventStore>(store: &S) {
    for chunk in 0..EVENTS / 1000 {
        let batch = aftermath_tests::deposits(chunk * 1000, 1000);
        store
            .append("big-1", ExpectedVersion::Exact(chunk * 1000), batch)
            .await
            .unwrap();
    }
}

async fn peak_while<F: std::future::Future<Output = u64>>(f: F) -> (usize, u64) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let n = f.await;
    (PEAK.load(Ordering::SeqCst).saturating_sub(base), n)
}

async fn check<S: EventStore>(name: &str, store: &S) {
    fill(store).await;
    let (stream_peak, n) = peak_while(async {
        let mut events =
            std::pin::pin!(read_stream_all(store, "big-1", 1, Direction::Forward, PAGE));
        let mut n = 0;
        while events.try_next().await.unwrap().is_some() {
            n += 1;
        }
        n
    })
    .await;
    assert_eq!(n, EVENTS);
    let (all_peak, n) = peak_while(async {
        let mut events = std::pin::pin!(read_all_pages(
            store,
            Position::ORIGIN,
            Some(&["account.Deposited"]),
            PAGE
        ));
        let mut n = 0;
        while events.try_next().await.unwrap().is_some() {
            n += 1;
        }
        n
    })
    .await;
    assert_eq!(n, EVENTS);
    eprintln!(
        "{name}: peak extra heap reading {EVENTS} events: stream {stream_peak} B, $all {all_peak} B"
    );
    assert!(
        stream_peak < BOUND,
        "{name}: stream read peaked at {stream_peak} bytes"
    );
    assert!(
        all_peak < BOUND,
        "{name}: $all read peaked at {all_peak} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_bounded_by_the_page_size() {
    check("memory", &MemoryStore::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("big.db")).await.unwrap();
    check("sqlite", &store).await;
}
