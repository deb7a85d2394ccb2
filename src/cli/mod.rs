//! The command-line interface: one file per command, each a thin layer over the library.

pub mod eval;
pub mod generate;
pub mod merge;
pub mod train;
