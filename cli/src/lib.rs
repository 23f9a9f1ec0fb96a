//! The library side of the `aftermath` tool: commands that need the
//! application's own code, mounted in the application's `main` (as `sqlx`'s
//! migrations are).
//!
//! [`rebuild()`] rebuilds a projection the application registers, with a
//! progress bar on a terminal and a safe stop on Ctrl-C; [`resume`]
//! continues an interrupted rebuild from its checkpoint:
//!
//! ```no_run
//! # use aftermath::projection::{Projection, ProjectionRunner};
//! # async fn example<P: Projection>(runner: ProjectionRunner<P, aftermath::SqliteStore>) -> Result<(), Box<dyn std::error::Error>> {
//! match std::env::args().nth(1).as_deref() {
//!     Some("rebuild") => println!("{}", aftermath_cli::rebuild(&runner).await?),
//!     Some("resume") => println!("{}", aftermath_cli::resume(&runner).await?),
//!     _ => { /* run the application */ }
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod rebuild;

pub use rebuild::{Outcome, rebuild, rebuild_until, resume, resume_until};
