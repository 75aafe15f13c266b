"""Pure tensor math: exact per-filter counts, the optimal-transport codes, the CPU selection and the GPU kernels."""
