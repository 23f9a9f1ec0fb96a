//! The conformance suite against the in-memory store.

use aftermath::{MemoryStore, Upcasters};
use aftermath_tests::{Backend, Fresh};

struct Memory;

#[async_trait::async_trait]
impl Backend for Memory {
    type Store = MemoryStore;
    const NAME: &'static str = "memory";
    async fn open(upcasters: Upcasters) -> Result<Fresh<MemoryStore>, String> {
        Ok(Fresh {
            store: MemoryStore::with_upcasters(upcasters),
            guard: Box::new(()),
        })
    }
}

aftermath_tests::conformance_tests!(Memory);
