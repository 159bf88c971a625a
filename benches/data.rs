//! Data-pipeline benchmarks (decode + crops); filled in with the loader.
fn main() {}
