// kernels/prep.cu built as a host shared library for tests/kernels_on_host.rs: the CUDA qualifiers become
// plain C++, a launch becomes a loop over one-thread blocks driven from Rust through `host_set_block`, so
// every kernel's arithmetic is checked on every CI run, not only on a GPU host.
#include <algorithm>

using std::max;
using std::min;
struct Dim3 { unsigned x, y, z; };
static Dim3 blockIdx, blockDim = {1, 1, 1}, threadIdx = {0, 0, 0};
#define __device__
#define __forceinline__ inline
#define __global__
#include "prep.cu"

extern "C" void host_set_block(unsigned x, unsigned y) { blockIdx = {x, y, 0}; }
