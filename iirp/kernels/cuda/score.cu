// Fused IterStop score: the five float64 sums of a, b, a*a, b*b, a*b with
// a = warp(moving, up_s(flow)) and b = fixed, over the full-resolution grid,
// without storing the upsampled flow or the warped image (SPEC section 5).
// The CUDA port of the fused score (iirp/kernels/score.py `_fused_sums`, through
// _sampling.sample_tile; e109593 `_fused_slab`): per voxel the coarse
// flow is upsampled on the fly exactly as upsample.cu / `upsample()` write it
// and the moving image is sampled exactly as warp.cu / `warp()` do (see
// sampling.cuh), so every per-voxel term equals the numba one bit for bit;
// only the order in which the terms are added differs.
//
// Determinism: iirp_score_partials writes one row of five sums per block
// (a fixed shared-memory tree over IIRP_SCORE_BLOCK threads, one voxel per
// thread); iirp_score_sum then adds the rows in a fixed order (a strided serial
// sum per thread, then the same tree). No atomics: the result depends only on
// the inputs and the shape, not on the GPU or on scheduling. The host finishes
// the NCC in float64 exactly as score.py `_ncc_from_sums`.
//
// Both kernels must be launched with exactly IIRP_SCORE_BLOCK threads per block
// (iirp.kernels.cuda_ops._SCORE_BLOCK); iirp_score_sum with a single block.
//
// Name expressions: iirp_score_partials, iirp_score_sum.

#include "sampling.cuh"

#define IIRP_SCORE_BLOCK 256

// Sum five per-thread values over the block in a fixed tree order; thread 0
// writes the totals to dst[0..4] (order: a, b, a*a, b*b, a*b).
__device__ __forceinline__ void iirp_block_sum5(double s0, double s1, double s2, double s3, double s4,
                                                double* __restrict__ dst)
{
    __shared__ double sh[5][IIRP_SCORE_BLOCK];
    const int t = threadIdx.x;
    sh[0][t] = s0;
    sh[1][t] = s1;
    sh[2][t] = s2;
    sh[3][t] = s3;
    sh[4][t] = s4;
    __syncthreads();
    for (int stride = IIRP_SCORE_BLOCK / 2; stride > 0; stride >>= 1) {
        if (t < stride) {
            sh[0][t] += sh[0][t + stride];
            sh[1][t] += sh[1][t + stride];
            sh[2][t] += sh[2][t + stride];
            sh[3][t] += sh[3][t + stride];
            sh[4][t] += sh[4][t + stride];
        }
        __syncthreads();
    }
    if (t == 0) {
        dst[0] = sh[0][0];
        dst[1] = sh[1][0];
        dst[2] = sh[2][0];
        dst[3] = sh[3][0];
        dst[4] = sh[4][0];
    }
}

// One component of the upsampled flow at full-resolution voxel (x, y, z),
// unscaled: the z-resized coarse planes blended over y and x. For factor 1 the
// planes are the flow itself (numba passes the flow as its planes).
__device__ __forceinline__ float iirp_upsampled(const float* __restrict__ f, int factor, int z, int cny, int cnz,
                                                const iirp_corners& cx, const iirp_corners& cy,
                                                const iirp_corners& cz)
{
    float p00;
    float p01;
    float p10;
    float p11;
    if (factor == 1) {
        p00 = f[(cx.i0 * cny + cy.i0) * cnz + z];
        p01 = f[(cx.i0 * cny + cy.i1) * cnz + z];
        p10 = f[(cx.i1 * cny + cy.i0) * cnz + z];
        p11 = f[(cx.i1 * cny + cy.i1) * cnz + z];
    } else {
        p00 = iirp_zlerp(f, cx.i0, cy.i0, cny, cnz, cz);
        p01 = iirp_zlerp(f, cx.i0, cy.i1, cny, cnz, cz);
        p10 = iirp_zlerp(f, cx.i1, cy.i0, cny, cnz, cz);
        p11 = iirp_zlerp(f, cx.i1, cy.i1, cny, cnz, cz);
    }
    return iirp_blend_xy(p00, p01, p10, p11, cx, cy);
}

// Per-block sums (float64) of a, b, a*a, b*b, a*b into partials[5 * blockIdx.x + k].
// moving, fixed: (nx, ny, nz) float32 at full resolution; flow: (3, nx/factor,
// ny/factor, nz/factor) float32 in coarse voxels. A voxel whose sample point
// has no corner inside the volume contributes a = 0 (zero padding) but still
// contributes b. Grid: ceil(nx*ny*nz / IIRP_SCORE_BLOCK) blocks.
__global__ void __launch_bounds__(IIRP_SCORE_BLOCK) iirp_score_partials(
    const float* __restrict__ moving, const float* __restrict__ fixed, const float* __restrict__ flow,
    double* __restrict__ partials, int nx, int ny, int nz, int factor)
{
    const int cnx = nx / factor;
    const int cny = ny / factor;
    const int cnz = nz / factor;
    const long long n = (long long)nx * ny * nz;
    const long long cn = (long long)cnx * cny * cnz;
    const long long v = iirp_thread_index();
    double sa = 0.0;
    double sb = 0.0;
    double saa = 0.0;
    double sbb = 0.0;
    double sab = 0.0;
    if (v < n) {  // no early return: every thread takes part in the block sum
        const iirp_voxel p = iirp_voxel_of(v, ny, nz);
        const int x = p.x;
        const int y = p.y;
        const int z = p.z;
        const iirp_corners rx = iirp_resize_axis(x, cnx, nx);
        const iirp_corners ry = iirp_resize_axis(y, cny, ny);
        const iirp_corners rz = iirp_resize_axis(z, cnz, nz);
        const float u0 = iirp_upsampled(flow, factor, z, cny, cnz, rx, ry, rz);
        const float u1 = iirp_upsampled(flow + cn, factor, z, cny, cnz, rx, ry, rz);
        const float u2 = iirp_upsampled(flow + 2 * cn, factor, z, cny, cnz, rx, ry, rz);
        // the upsampled flow is scaled by the factor (a voxel-unit flow follows its grid)
        const float s = (float)factor;
        const float px = (float)x + s * u0;
        const float py = (float)y + s * u1;
        const float pz = (float)z + s * u2;
        const double b = (double)fixed[v];
        sb = b;
        sbb = b * b;
        if (iirp_inside(px, py, pz, nx, ny, nz)) {
            const iirp_corners cx = iirp_axis(px, nx);
            const iirp_corners cy = iirp_axis(py, ny);
            const iirp_corners cz = iirp_axis(pz, nz);
            const double a = (double)iirp_lerp3(moving, ny, nz, cx, cy, cz);
            sa = a;
            saa = a * a;
            sab = a * b;
        }
    }
    iirp_block_sum5(sa, sb, saa, sbb, sab, partials + 5 * (long long)blockIdx.x);
}

// sums[k] = sum over rows r of partials[5 r + k], k = 0..4, in a fixed order:
// thread t adds rows t, t + B, t + 2B, ... serially (B = IIRP_SCORE_BLOCK),
// then the block tree. Launch with one block.
__global__ void __launch_bounds__(IIRP_SCORE_BLOCK) iirp_score_sum(const double* __restrict__ partials, int nrows,
                                                                   double* __restrict__ sums)
{
    double s0 = 0.0;
    double s1 = 0.0;
    double s2 = 0.0;
    double s3 = 0.0;
    double s4 = 0.0;
    for (int r = threadIdx.x; r < nrows; r += IIRP_SCORE_BLOCK) {
        const double* row = partials + 5 * (long long)r;
        s0 += row[0];
        s1 += row[1];
        s2 += row[2];
        s3 += row[3];
        s4 += row[4];
    }
    iirp_block_sum5(s0, s1, s2, s3, s4, sums);
}
