// rexprep CUDA kernels: the CPU reference path of crates/rexprep/src (color.rs, resize.rs, patchify.rs) on
// device buffers. Compiled to PTX by build.rs with `nvcc --ptx -fmad=false` (no FMA contraction anywhere
// floats appear, so results round exactly like the CPU) and loaded at run time through cudarc.
//
// Data flow on one CUDA stream:
//   yuv planes (u8) --nv12_to_rgb / i420_to_rgb--> rgb (u8, packed)
//   rgb --resize_h--> tmp (u8, only the rows the vertical pass reads) --resize_v--> resized (u8, packed)
//   resized --patchify--> pixel_values (f32, [N, 1176], 2x2 merge-group row order)
// Colour conversion (videoconvert's fixed point) and resize (Pillow 10.4 fixed point, 22 fractional bits)
// are integer math: bit-identical to the CPU path.

typedef unsigned char u8;

#define PRECISION_BITS 22
#define HALF (1 << (PRECISION_BITS - 1))

__device__ __forceinline__ u8 clip8(int acc) {
    int v = acc >> PRECISION_BITS;
    return (u8)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// GStreamer 1.22 videoconvert's 8-bit fixed point, as YuvToRgb::pixel in color.rs: the sample minus 128
// splatted into both bytes of a 16-bit word, products keep their high 16 bits, the sum saturates to a
// signed byte and is shifted back by 128. The sums never leave 16 bits, so plain int arithmetic is exact.
struct YuvMatrix { int y, rv, gu, gv, bu, cosited; };

__device__ __forceinline__ int splat(u8 s) {
    unsigned b = s ^ 0x80u;
    return (int)(short)(unsigned short)((b << 8) | b);
}
__device__ __forceinline__ int mulhs(int a, int b) { return (a * b) >> 16; }
__device__ __forceinline__ u8 unbias(int w) { return (u8)((w < -128 ? -128 : (w > 127 ? 127 : w)) + 128); }

__device__ __forceinline__ void yuv_px(u8 y, u8 u, u8 v, const YuvMatrix& m, u8* out) {
    int wy = mulhs(splat(y), m.y), wu = splat(u), wv = splat(v);
    out[0] = unbias(wy + mulhs(wv, m.rv));
    out[1] = unbias(wy + mulhs(wu, m.gu) + mulhs(wv, m.gv));
    out[2] = unbias(wy + mulhs(wu, m.bu));
}

// Component c of full-width chroma sample x from one interleaved half-width UV row (color.rs: upsample_h).
__device__ __forceinline__ int upsample_h(const u8* row, int x, int w, int c, int cosited) {
#define AT(k) ((int)row[2 * (k) + c])
    int k = x / 2;
    if (x == 0 || (x == w - 1 && (x & 1))) return AT(k);
    if (cosited) return (x & 1) ? (AT(k) + AT(k + 1) + 1) >> 1 : AT(k);
    return (x & 1) ? (3 * AT(k) + AT(k + 1) + 2) >> 2 : (AT(k - 1) + 3 * AT(k) + 2) >> 2;
#undef AT
}

// NV12 chroma is upsampled like videoconvert's generic path: horizontally per siting, then 3:1 / 1:3
// between the two nearest chroma rows (color.rs: chroma_rows).
extern "C" __global__ void nv12_to_rgb(const u8* y_plane, int y_stride, const u8* uv_plane, int uv_stride,
                                       u8* rgb, int w, int h, YuvMatrix mat) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= w || y >= h) return;
    int ra, wa, rb, wb;
    if (y & 1) {
        ra = y / 2, wa = 3, rb = min(y + 1, h - 1) / 2, wb = 1;
    } else {
        ra = (max(y, 1) - 1) / 2, wa = 1, rb = y / 2, wb = 3;
    }
    const u8* a = uv_plane + (size_t)ra * uv_stride;
    const u8* b = uv_plane + (size_t)rb * uv_stride;
    int u = (wa * upsample_h(a, x, w, 0, mat.cosited) + wb * upsample_h(b, x, w, 0, mat.cosited) + 2) >> 2;
    int v = (wa * upsample_h(a, x, w, 1, mat.cosited) + wb * upsample_h(b, x, w, 1, mat.cosited) + 2) >> 2;
    yuv_px(y_plane[(size_t)y * y_stride + x], (u8)u, (u8)v, mat, rgb + ((size_t)y * w + x) * 3);
}

// I420 takes videoconvert's fast path: the nearest chroma sample for each 2x2 block.
extern "C" __global__ void i420_to_rgb(const u8* y_plane, int y_stride, const u8* u_plane, int u_stride,
                                       const u8* v_plane, int v_stride, u8* rgb, int w, int h, YuvMatrix mat) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= w || y >= h) return;
    size_t c = (size_t)(y / 2);
    yuv_px(y_plane[(size_t)y * y_stride + x], u_plane[c * u_stride + x / 2], v_plane[c * v_stride + x / 2],
           mat, rgb + ((size_t)y * w + x) * 3);
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
