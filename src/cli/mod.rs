//! The subcommands besides `run`: each parses its arguments, calls the
//! library and prints.

pub mod demo;
pub mod stress;
