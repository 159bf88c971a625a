//! CPU launches of `kernels/softmax_ce.cu` (see the module doc of `emu`).
