//! SQLite backend (being written).
/// Options.
pub struct SqliteOptions;
/// Store.
pub struct SqliteStore;
/// Sync mode.
pub enum Synchronous { /// normal
 Normal }
