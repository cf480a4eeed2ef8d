//! The tests that move the clock; `.ci/test` runs them beside the suite and leaves them out of the
//! main run by this module's name (`--skip shifted_clock::`).

mod chunk_gc;
mod prune;
mod prune_blobs;
