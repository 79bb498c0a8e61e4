// Shared device helpers of the iirp CUDA kernels: storage types, trilinear
// corners, the align_corners=True resize table. Included by warp.cu,
// upsample.cu and score.cu; compiled with NVRTC by iirp.kernels.cuda_build.
//
// They compute, operation for operation, what the numba kernels compute per
// voxel: the per-voxel rule of iirp/kernels/_sampling.py (`_corners`,
// `sample_tile`) and iirp/kernels/upsample.py (`_axis_table`, `_zlerp_planes`,
// `_upsample_rows`), written there row-chunked for vectorization; the readable
// per-voxel form they were ported from is the frozen e109593 copy in
// tests/kernels/numba_e109593.py (`_axis`, `_inside`, `_lerp3`, `_blend_xy`),
// which the numba kernels are tested bit-identical to. cuda_build compiles with --fmad=false and IEEE
// division, so every float32 operation below rounds exactly as numba's
// (fastmath off): the GPU results match the CPU kernels bit for bit.
//
// Layout (SPEC section 3, iirp.runtime.geometry): C-contiguous volumes
// (X, Y, Z), z fastest; a voxel (x, y, z) is at (x * ny + y) * nz + z. Callers
// guarantee X * Y * Z < 2^31, so in-volume offsets fit in int; channel offsets
// use long long.
//
// No #include: the NVRTC shipped on PyPI has no CUDA headers, so fp16 is
// handled with a bit-compatible storage struct and PTX conversions.
//
// Host build: tests/cudahost/host_shim.h compiles these sources as host C++
// (the cudahost tests) and defines IIRP_HOST_SHIM, which replaces only the two
// inline-PTX conversions by its exact software equivalents. NVRTC never defines
// it, so the device code is unchanged.

#pragma once

// IEEE binary16 storage, bit-compatible with __half, torch.float16 and numpy.float16.
struct alignas(2) iirp_half {
    unsigned short bits;
};

__device__ __forceinline__ float iirp_to_float(float v) { return v; }

__device__ __forceinline__ float iirp_to_float(iirp_half v)
{
#if defined(IIRP_HOST_SHIM)
    return iirp_host::half_to_float(v.bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));  // exact
    return f;
#endif
}

template <typename T> __device__ __forceinline__ T iirp_from_float(float v);

template <> __device__ __forceinline__ float iirp_from_float<float>(float v) { return v; }

template <> __device__ __forceinline__ iirp_half iirp_from_float<iirp_half>(float v)
{
    iirp_half h;
#if defined(IIRP_HOST_SHIM)
    h.bits = iirp_host::float_to_half(v);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));  // round to nearest even, like numpy/torch
#endif
    return h;
}

// Two corners along one axis and their weights.
struct iirp_corners {
    int i0;
    int i1;
    float w0;
    float w1;
};

// e109593 warp._axis (now _sampling._corners): corners and weights of float32 coordinate t on an axis of
// n voxels; a corner outside [0, n) is clamped and gets weight 0 (zero padding).
// The caller guarantees -1 < t < n (see iirp_inside).
__device__ __forceinline__ iirp_corners iirp_axis(float t, int n)
{
    const float f = floorf(t);
    iirp_corners c;
    c.w1 = t - f;
    c.w0 = 1.0f - c.w1;
    c.i0 = (int)f;
    c.i1 = c.i0 + 1;
    if (c.i0 < 0) {  // only i0 == -1 is possible here
        c.i0 = 0;
        c.w0 = 0.0f;
    }
    if (c.i1 > n - 1) {  // only i1 == n is possible here
        c.i1 = n - 1;
        c.w1 = 0.0f;
    }
    return c;
}

// e109593 warp._inside (now in _sampling._corners): true when at least one corner of (x, y, z) can lie in
// the volume; false for NaN and infinities.
__device__ __forceinline__ bool iirp_inside(float x, float y, float z, int nx, int ny, int nz)
{
    return x > -1.0f && x < (float)nx && y > -1.0f && y < (float)ny && z > -1.0f && z < (float)nz;
}

// e109593 warp._lerp3 (now _sampling.sample_tile): trilinear blend of one (X, Y, Z) volume, z innermost,
// then y, then x.
template <typename T>
__device__ __forceinline__ float iirp_lerp3(const T* __restrict__ vol, int ny, int nz, const iirp_corners& cx,
                                            const iirp_corners& cy, const iirp_corners& cz)
{
    const int r00 = (cx.i0 * ny + cy.i0) * nz;
    const int r01 = (cx.i0 * ny + cy.i1) * nz;
    const int r10 = (cx.i1 * ny + cy.i0) * nz;
    const int r11 = (cx.i1 * ny + cy.i1) * nz;
    const float v00 = cz.w0 * iirp_to_float(vol[r00 + cz.i0]) + cz.w1 * iirp_to_float(vol[r00 + cz.i1]);
    const float v01 = cz.w0 * iirp_to_float(vol[r01 + cz.i0]) + cz.w1 * iirp_to_float(vol[r01 + cz.i1]);
    const float v10 = cz.w0 * iirp_to_float(vol[r10 + cz.i0]) + cz.w1 * iirp_to_float(vol[r10 + cz.i1]);
    const float v11 = cz.w0 * iirp_to_float(vol[r11 + cz.i0]) + cz.w1 * iirp_to_float(vol[r11 + cz.i1]);
    return cx.w0 * (cy.w0 * v00 + cy.w1 * v01) + cx.w1 * (cy.w0 * v10 + cy.w1 * v11);
}

// numba upsample._axis_table at output index p: linear resize of an axis from
// n to size samples with align_corners=True, PyTorch's CPU arithmetic in
// float32 (scale (n - 1) / (size - 1), source scale * p, i0 = min(floor, n - 1),
// w1 = clamp(source - i0, 0, 1), i1 = i0 + (i0 < n - 1)); the identity when size == n.
__device__ __forceinline__ iirp_corners iirp_resize_axis(int p, int n, int size)
{
    iirp_corners c;
    if (size == n) {
        c.i0 = p;
        c.i1 = p;
        c.w0 = 1.0f;
        c.w1 = 0.0f;
        return c;
    }
    const float scale = size > 1 ? (float)(n - 1) / (float)(size - 1) : 0.0f;
    const float source = scale * (float)p;
    int i0 = (int)floorf(source);
    if (i0 > n - 1) {
        i0 = n - 1;
    }
    const float w1 = fminf(fmaxf(source - (float)i0, 0.0f), 1.0f);
    c.i0 = i0;
    c.i1 = i0 < n - 1 ? i0 + 1 : i0;
    c.w0 = 1.0f - w1;
    c.w1 = w1;
    return c;
}

// numba upsample._zlerp_planes at one (i, j, output z): the coarse flow
// channel f resized along z only.
__device__ __forceinline__ float iirp_zlerp(const float* __restrict__ f, int i, int j, int ny, int nz,
                                            const iirp_corners& cz)
{
    const int row = (i * ny + j) * nz;
    return cz.w0 * f[row + cz.i0] + cz.w1 * f[row + cz.i1];
}

// e109593 upsample._blend_xy (now upsample._upsample_rows) for one channel: blend four z-resized plane values
// over y, then x (unscaled).
__device__ __forceinline__ float iirp_blend_xy(float p00, float p01, float p10, float p11, const iirp_corners& cx,
                                               const iirp_corners& cy)
{
    return cx.w0 * (cy.w0 * p00 + cy.w1 * p01) + cx.w1 * (cy.w0 * p10 + cy.w1 * p11);
}

// Flat thread index over a 1-D grid, as long long (no 32-bit overflow).
__device__ __forceinline__ long long iirp_thread_index()
{
    return (long long)blockIdx.x * (long long)blockDim.x + (long long)threadIdx.x;
}

// (x, y, z) of the flat index v of a C-contiguous (X, ny, nz) grid, z fastest; v < 2^31.
struct iirp_voxel {
    int x, y, z;
};

__device__ __forceinline__ iirp_voxel iirp_voxel_of(long long v, int ny, int nz)
{
    const int vi = (int)v;
    iirp_voxel p;
    p.z = vi % nz;
    p.y = (vi / nz) % ny;
    p.x = vi / (nz * ny);
    return p;
}
