//! CPU launches of `kernels/elementwise.cu` (see the module doc of `emu`).
