//! (op timing harness: filled in later)
