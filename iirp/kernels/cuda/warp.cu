// Warp, compose and nearest-neighbour label warp (SPEC section 3).
//
// warp(src, u)(p) = src(p + u(p)): trilinear, align_corners=True (voxel
// centres at integer indices), zero padding; the CUDA port of
// iirp/kernels/warp.py `_warp_kernel`, bit for bit (see sampling.cuh).
// compose(phi, du) = warp(phi, du) + du.
//
// One thread per voxel of the (X, Y, Z) grid (z fastest), all channels in the
// thread. Flows are (3, X, Y, Z) float32 displacements in voxels, component c
// along array axis c. The caller guarantees X * Y * Z < 2^31.
//
// Name expressions: iirp_warp<float>, iirp_warp<iirp_half>, iirp_compose,
// iirp_warp_nearest<int>, iirp_warp_nearest<short>, iirp_warp_nearest<unsigned char>.

#include "sampling.cuh"

// out[c, p] = src[c](p + flow[:, p]) for c < nc; T is float or iirp_half
// (storage only: the blend runs in float32 and is rounded once on store).
template <typename T>
__global__ void __launch_bounds__(256) iirp_warp(const T* __restrict__ src, const float* __restrict__ flow,
                                                 T* __restrict__ out, int nc, int nx, int ny, int nz)
{
    const long long n = (long long)nx * ny * nz;
    const long long v = iirp_thread_index();
    if (v >= n) {
        return;
    }
    const iirp_voxel p = iirp_voxel_of(v, ny, nz);
    const int x = p.x;
    const int y = p.y;
    const int z = p.z;
    const float px = (float)x + flow[v];
    const float py = (float)y + flow[n + v];
    const float pz = (float)z + flow[2 * n + v];
    if (iirp_inside(px, py, pz, nx, ny, nz)) {
        const iirp_corners cx = iirp_axis(px, nx);
        const iirp_corners cy = iirp_axis(py, ny);
        const iirp_corners cz = iirp_axis(pz, nz);
        for (int c = 0; c < nc; ++c) {
            const long long base = (long long)c * n;
            out[base + v] = iirp_from_float<T>(iirp_lerp3(src + base, ny, nz, cx, cy, cz));
        }
    } else {
        for (int c = 0; c < nc; ++c) {
            out[(long long)c * n + v] = iirp_from_float<T>(0.0f);
        }
    }
}

// out = warp(phi, du) + du, all (3, X, Y, Z) float32: apply du first, then phi.
// Outside the volume warp(phi, du) is 0, so out = du there.
__global__ void __launch_bounds__(256) iirp_compose(const float* __restrict__ phi, const float* __restrict__ du,
                                                    float* __restrict__ out, int nx, int ny, int nz)
{
    const long long n = (long long)nx * ny * nz;
    const long long v = iirp_thread_index();
    if (v >= n) {
        return;
    }
    const iirp_voxel p = iirp_voxel_of(v, ny, nz);
    const int x = p.x;
    const int y = p.y;
    const int z = p.z;
    const float d0 = du[v];
    const float d1 = du[n + v];
    const float d2 = du[2 * n + v];
    const float px = (float)x + d0;
    const float py = (float)y + d1;
    const float pz = (float)z + d2;
    if (iirp_inside(px, py, pz, nx, ny, nz)) {
        const iirp_corners cx = iirp_axis(px, nx);
        const iirp_corners cy = iirp_axis(py, ny);
        const iirp_corners cz = iirp_axis(pz, nz);
        out[v] = iirp_lerp3(phi, ny, nz, cx, cy, cz) + d0;
        out[n + v] = iirp_lerp3(phi + n, ny, nz, cx, cy, cz) + d1;
        out[2 * n + v] = iirp_lerp3(phi + 2 * n, ny, nz, cx, cy, cz) + d2;
    } else {
        out[v] = d0;
        out[n + v] = d1;
        out[2 * n + v] = d2;
    }
}

// Nearest index along one axis, rounding half up: r = floor(t + 1/2), with t =
// index + flow formed in double, where the sum of an int and a float is exact, so
// the rounding is the exact one (a float32 sum could itself round onto or off a
// half-voxel tie). Returns -1 when r is outside [0, n), i.e. unless
// -1/2 <= t < n - 1/2; NaN and infinities are outside. This is ITK's
// nearest-neighbour rule (RoundHalfIntegerUp plus its continuous-index inside test),
// which ITK evaluates in double.
__device__ __forceinline__ int iirp_nearest_index(double t, int n)
{
    if (!(t >= -0.5 && t < (double)n - 0.5)) {
        return -1;
    }
    const double f = floor(t);
    return (int)f + (t - f >= 0.5 ? 1 : 0);
}

// out[p] = labels[round(p + flow[:, p])] with round-half-up per axis, and 0
// (background) where the rounded point falls outside the volume. L is the label
// storage type (int32, int16 or uint8), copied unchanged: no interpolation.
template <typename L>
__global__ void __launch_bounds__(256) iirp_warp_nearest(const L* __restrict__ labels,
                                                         const float* __restrict__ flow, L* __restrict__ out,
                                                         int nx, int ny, int nz)
{
    const long long n = (long long)nx * ny * nz;
    const long long v = iirp_thread_index();
    if (v >= n) {
        return;
    }
    const iirp_voxel p = iirp_voxel_of(v, ny, nz);
    const int x = p.x;
    const int y = p.y;
    const int z = p.z;
    const int i = iirp_nearest_index((double)x + (double)flow[v], nx);
    const int j = iirp_nearest_index((double)y + (double)flow[n + v], ny);
    const int k = iirp_nearest_index((double)z + (double)flow[2 * n + v], nz);
    out[v] = (i < 0 || j < 0 || k < 0) ? (L)0 : labels[(i * ny + j) * nz + k];
}
