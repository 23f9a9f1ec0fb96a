//! The process manager suite (`aftermath_tests::process`) in memory:
//! `MemoryStore`, `MemoryDeadlines`, `MemoryCheckpoints` and one
//! `MemoryJournal` shared by the reactors.

use aftermath::MemoryStore;
use aftermath::process::MemoryDeadlines;
use aftermath::reactor::MemoryJournal;
use aftermath::subscription::MemoryCheckpoints;
use aftermath_tests::process::{Parts, ProcessBackend};

struct Memory;

#[async_trait::async_trait]
impl ProcessBackend for Memory {
    type Store = MemoryStore;
    type Deadlines = MemoryDeadlines;
    type Checkpoints = MemoryCheckpoints;
    type Journal = MemoryJournal;
    const NAME: &'static str = "memory";

    async fn open() -> Result<Parts<Self>, String> {
        Ok(Parts {
            store: MemoryStore::new(),
            deadlines: MemoryDeadlines::new(),
            checkpoints: MemoryCheckpoints::new(),
            journal: MemoryJournal::new(),
            guard: Box::new(()),
        })
    }

    /// The data lives in the handles: a restart keeps them (everything the
    /// runner held in memory besides is gone with the runner).
    async fn reopen(parts: Parts<Self>) -> Parts<Self> {
        parts
    }
}

aftermath_tests::process_tests!(Memory);
