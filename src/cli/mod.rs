//! The subcommands besides `run`: each parses its arguments, calls the
//! library and prints; and what several share (the observers' options,
//! progress bars).

pub mod demo;
pub mod folios;
pub mod observe;
pub mod progress;
pub mod stress;
