// Flow upsampling up_s(u) = s * trilinear_resize(u, s x, align_corners=True)
// (SPEC section 3), the CUDA port of iirp/kernels/upsample.py, bit for bit:
// the z resize of the four (x, y) corner columns (`_zlerp_planes`), then the
// blend over y and x (`_blend_xy`), then the scale by s, all in float32 with
// the indices and weights of `_axis_table` (see sampling.cuh). The numba code
// stores the z-resized planes; here each thread recomputes its four plane
// values with the same operations, so the result is identical.
//
// One thread per voxel of the fine (s x, s y, s z) grid. Flows are
// (3, x, y, z) float32 displacements in voxels of their own grid, component c
// along array axis c. The caller guarantees (s x)(s y)(s z) < 2^31.
//
// Name expressions: iirp_upsample.

#include "sampling.cuh"

// out (3, s nx, s ny, s nz) = factor * resize(flow (3, nx, ny, nz)); factor >= 1.
// factor == 1 copies (PyTorch and the numba kernel copy when the size is unchanged).
__global__ void __launch_bounds__(256) iirp_upsample(const float* __restrict__ flow, float* __restrict__ out,
                                                     int nx, int ny, int nz, int factor)
{
    const int ox = factor * nx;
    const int oy = factor * ny;
    const int oz = factor * nz;
    const long long n_in = (long long)nx * ny * nz;
    const long long n_out = (long long)ox * oy * oz;
    const long long v = iirp_thread_index();
    if (v >= n_out) {
        return;
    }
    if (factor == 1) {
        out[v] = flow[v];
        out[n_out + v] = flow[n_in + v];
        out[2 * n_out + v] = flow[2 * n_in + v];
        return;
    }
    const iirp_voxel p = iirp_voxel_of(v, oy, oz);
    const int x = p.x;
    const int y = p.y;
    const int z = p.z;
    const iirp_corners cx = iirp_resize_axis(x, nx, ox);
    const iirp_corners cy = iirp_resize_axis(y, ny, oy);
    const iirp_corners cz = iirp_resize_axis(z, nz, oz);
    const float s = (float)factor;
    for (int c = 0; c < 3; ++c) {
        const float* f = flow + (long long)c * n_in;
        const float p00 = iirp_zlerp(f, cx.i0, cy.i0, ny, nz, cz);
        const float p01 = iirp_zlerp(f, cx.i0, cy.i1, ny, nz, cz);
        const float p10 = iirp_zlerp(f, cx.i1, cy.i0, ny, nz, cz);
        const float p11 = iirp_zlerp(f, cx.i1, cy.i1, ny, nz, cz);
        // a voxel-unit flow is rescaled with its grid: multiply by the factor
        out[(long long)c * n_out + v] = s * iirp_blend_xy(p00, p01, p10, p11, cx, cy);
    }
}
