//! The process manager suite (`aftermath_tests::process`) in memory
//! ([`aftermath_tests::process::MemoryBackend`]).

use aftermath_tests::process::MemoryBackend as Memory;

aftermath_tests::process_tests!(Memory);
