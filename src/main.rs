//! The `sdengine` command line. Parsing only: every command calls into the library.

fn main() {
    println!("sdengine {}", env!("CARGO_PKG_VERSION"));
}
