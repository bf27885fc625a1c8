// rexprep CUDA kernels: the CPU reference path of crates/rexprep/src (color.rs, resize.rs, patchify.rs) on
// device buffers. Compiled to PTX by build.rs with `nvcc --ptx -fmad=false` (no FMA contraction, so the
// float colour conversion rounds exactly like the CPU) and loaded at run time through cudarc.
//
// Data flow on one CUDA stream:
//   yuv planes (u8) --nv12_to_rgb / i420_to_rgb--> rgb (u8, packed)
//   rgb --resize_h--> tmp (u8, only the rows the vertical pass reads) --resize_v--> resized (u8, packed)
//   resized --patchify--> pixel_values (f32, [N, 1176], 2x2 merge-group row order)
// Resize is Pillow 10.4 fixed point (22 fractional bits, integer math): bit-identical to the CPU path.

typedef unsigned char u8;

#define PRECISION_BITS 22
#define HALF (1 << (PRECISION_BITS - 1))

__device__ __forceinline__ u8 clip8(int acc) {
    int v = acc >> PRECISION_BITS;
    return (u8)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Same arithmetic and order as YuvToRgb::pixel in color.rs; m = {y_off, y_mul, rv, gu, gv, bu}.
__device__ __forceinline__ void yuv_px(u8 y, u8 u, u8 v, const float* m, u8* out) {
    float yy = ((float)y - m[0]) * m[1];
    float uu = (float)u - 128.0f, vv = (float)v - 128.0f;
    float r = yy + m[2] * vv;
    float g = (yy + m[3] * uu) + m[4] * vv;
    float b = yy + m[5] * uu;
    out[0] = (u8)fminf(fmaxf(r + 0.5f, 0.0f), 255.0f);
    out[1] = (u8)fminf(fmaxf(g + 0.5f, 0.0f), 255.0f);
    out[2] = (u8)fminf(fmaxf(b + 0.5f, 0.0f), 255.0f);
}

struct YuvMatrix { float m[6]; };

extern "C" __global__ void nv12_to_rgb(const u8* y_plane, int y_stride, const u8* uv_plane, int uv_stride,
                                       u8* rgb, int w, int h, YuvMatrix mat) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= w || y >= h) return;
    const u8* uv = uv_plane + (size_t)(y / 2) * uv_stride + (x / 2) * 2;
    yuv_px(y_plane[(size_t)y * y_stride + x], uv[0], uv[1], mat.m, rgb + ((size_t)y * w + x) * 3);
}

extern "C" __global__ void i420_to_rgb(const u8* y_plane, int y_stride, const u8* u_plane, int u_stride,
                                       const u8* v_plane, int v_stride, u8* rgb, int w, int h, YuvMatrix mat) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= w || y >= h) return;
    size_t c = (size_t)(y / 2);
    yuv_px(y_plane[(size_t)y * y_stride + x], u_plane[c * u_stride + x / 2], v_plane[c * v_stride + x / 2],
           mat.m, rgb + ((size_t)y * w + x) * 3);
}

// Horizontal pass: output pixel (xx, oy) of `rows` rows starting at source row `row0`.
// Taps of output xx: inputs start[xx] .. start[xx]+count[xx], weights w[xx*ksize ..].
extern "C" __global__ void resize_h(const u8* src, int src_stride, int row0, int rows, u8* dst, int dst_w,
                                    const int* start, const int* count, const int* weights, int ksize) {
    int xx = blockIdx.x * blockDim.x + threadIdx.x;
    int oy = blockIdx.y * blockDim.y + threadIdx.y;
    if (xx >= dst_w || oy >= rows) return;
    const u8* line = src + (size_t)(row0 + oy) * src_stride;
    const int* k = weights + (size_t)xx * ksize;
    int x0 = start[xx], n = count[xx];
    int r = HALF, g = HALF, b = HALF;
    for (int i = 0; i < n; i++) {
        const u8* p = line + (size_t)(x0 + i) * 3;
        r += (int)p[0] * k[i];
        g += (int)p[1] * k[i];
        b += (int)p[2] * k[i];
    }
    u8* o = dst + ((size_t)oy * dst_w + xx) * 3;
    o[0] = clip8(r);
    o[1] = clip8(g);
    o[2] = clip8(b);
}

// Vertical pass: output byte i of row yy. `src` row 0 is source row `row0`.
extern "C" __global__ void resize_v(const u8* src, int src_stride, int row0, u8* dst, int row_bytes, int dst_h,
                                    const int* start, const int* count, const int* weights, int ksize) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int yy = blockIdx.y * blockDim.y + threadIdx.y;
    if (i >= row_bytes || yy >= dst_h) return;
    const int* k = weights + (size_t)yy * ksize;
    int y0 = start[yy] - row0, n = count[yy];
    int acc = HALF;
    for (int t = 0; t < n; t++) acc += (int)src[(size_t)(y0 + t) * src_stride + i] * k[t];
    dst[(size_t)yy * row_bytes + i] = clip8(acc);
}

// pixel_values[n, k] for n < gh*gw, k < 1176 (rex-omni-spec.md §1.6), normalisation by table lookup
// (lut[c*256 + v], the CPU path's table uploaded once).
extern "C" __global__ void patchify(const u8* rgb, int w, int h, const float* lut, float* out) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int gh = h / 14, gw = w / 14;
    size_t total = (size_t)gh * gw * 1176;
    if (idx >= total) return;
    int n = (int)(idx / 1176), k = (int)(idx % 1176);
    int group = n / 4, sub = n % 4;
    int bh = group / (gw / 2), bw = group % (gw / 2);
    int r = bh * 2 + sub / 2, c = bw * 2 + sub % 2;
    int px = k % 14, py = (k / 14) % 14, ch = k / (14 * 14 * 2);  // t = (k / 196) % 2 is a repeat
    int y = r * 14 + py, x = c * 14 + px;
    out[idx] = lut[ch * 256 + rgb[((size_t)y * w + x) * 3 + ch]];
}
