// Host harness for the colour kernels of kernels/prep.cu (tests/kernels_on_host.rs): the CUDA qualifiers
// become plain C++ and each (x, y) runs as its own one-thread block, so the kernels' integer arithmetic is
// checked on every CI run, not only on a GPU host.
//
//   colour_kernels FORMAT W H S0 S1 S2 O0 O1 O2 Y RV GU GV BU COSITED IN_PLANES OUT_RGB
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using std::max;
using std::min;
struct Dim3 { int x, y, z; };
static Dim3 blockIdx, blockDim = {1, 1, 1}, threadIdx = {0, 0, 0};
#define __device__
#define __forceinline__ inline
#define __global__
#include "prep.cu"

int main(int argc, char** argv) {
    if (argc != 18) {
        fprintf(stderr, "usage: %s FORMAT W H S0 S1 S2 O0 O1 O2 Y RV GU GV BU COSITED IN OUT\n", argv[0]);
        return 2;
    }
    int a[14];
    for (int i = 0; i < 14; i++) a[i] = atoi(argv[2 + i]);
    int w = a[0], h = a[1];
    const int *s = a + 2, *o = a + 5;
    YuvMatrix m = {a[8], a[9], a[10], a[11], a[12], a[13]};
    FILE* f = fopen(argv[16], "rb");
    if (!f) { perror(argv[16]); return 1; }
    std::vector<unsigned char> planes;
    unsigned char buf[65536];
    for (size_t n; (n = fread(buf, 1, sizeof buf, f)) > 0;) planes.insert(planes.end(), buf, buf + n);
    fclose(f);
    std::vector<unsigned char> rgb((size_t)w * h * 3);
    const unsigned char* p = planes.data();
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            blockIdx = {x, y, 0};
            if (!strcmp(argv[1], "nv12"))
                nv12_to_rgb(p + o[0], s[0], p + o[1], s[1], rgb.data(), w, h, m);
            else
                i420_to_rgb(p + o[0], s[0], p + o[1], s[1], p + o[2], s[2], rgb.data(), w, h, m);
        }
    f = fopen(argv[17], "wb");
    if (!f || fwrite(rgb.data(), 1, rgb.size(), f) != rgb.size()) { perror(argv[17]); return 1; }
    return fclose(f) != 0;
}
