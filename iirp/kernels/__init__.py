"""Warp / compose / upsample / score kernels: CPU (numba) and CUDA (not implemented yet)."""
