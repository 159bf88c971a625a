//! CPU launches of `kernels/norm.cu` (see the module doc of `emu`).
