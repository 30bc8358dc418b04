// Grouped GEMV-like kernel for 4-bit weight-only experts (w4g128 and any 4-bit int
// scheme with a group that is a multiple of 32), for decode: few rows per expert.
//
// Same inputs as the Triton grouped GEMM (vllm_mxmoe/kernels/grouped_gemm.py): the
// flat per-layer buffers of kernels/layout.py, fp16 scales and zero points [N, K/group], and
// either packing of 4-bit codes, per expert (meta flag 8):
//   format v1: word j of a row holds elements 8j..8j+7, element i at bits 4i;
//   fragment order (layout._fragment_slots; w4g128 and per-channel w4): in each 128-element
//     chunk, the 16 bytes of lane chunk c (words 4c..4c+3) hold the elements whose bits 1-2
//     are c; word j, nibbles f and f + 4 are elements 2c + 8f + 32j and the one after it;
// and the routing of kernels/align.py (sorted_ids padded per expert to block_m rows,
// block_expert, num_blocks on the device). No host sync; CUDA-graph capturable.
//
// CTA = (M-block, 32 output rows); warp = 4 output rows; lane = 32-element K chunks
// (one 16-byte load per row). Dequantization: LOP3 of a nibble pair into the mantissa
// of 1024 (fp16) / 128 (bf16), one HSUB2 with (magic + zero): exact (q - zero) pairs,
// then fp32 FMAs with the activations; the group scale is applied once per chunk.
// Warp-shuffle reduction; lane 0 writes out[slot, n] (times the routed weight).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

template <typename T>
struct Traits;

template <>
struct Traits<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;
  static constexpr float kMagicF = 1024.f;
  __device__ __forceinline__ static float2 to_f2(uint32_t v) {
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
  }
  __device__ __forceinline__ static uint32_t sub(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ __forceinline__ static uint32_t splat(float x) {
    __half2 r = __float2half2_rn(x);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ __forceinline__ static __half from_f(float x) { return __float2half_rn(x); }
};

template <>
struct Traits<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;
  static constexpr float kMagicF = 128.f;
  __device__ __forceinline__ static float2 to_f2(uint32_t v) {
    // bf16 -> fp32 is a shift: low half << 16, high half & 0xffff0000.
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
  }
  __device__ __forceinline__ static uint32_t sub(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                               *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ __forceinline__ static uint32_t splat(float x) {
    __nv_bfloat162 r = __float2bfloat162_rn(x);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ __forceinline__ static __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
};

constexpr int kRowsPerWarp = 4;
constexpr int kWarps = 8;
constexpr int kRowsPerCta = kRowsPerWarp * kWarps;
constexpr int kMaxBlockM = 64;
constexpr int kFlagFragment = 8;  // layout.FLAG_FRAGMENT

struct Args {
  const void* a;
  const int32_t* qweight;
  const __half* scales;
  const __half* zeros;
  const int64_t* meta;
  void* out;
  const float* routed_weights;  // nullptr: none
  const int32_t* sorted_ids;
  const int32_t* block_expert;
  const int32_t* num_blocks;
  int n, k, num_slots, a_row_div, block_m;
  int64_t stride_am;
};

// The activations that meet word w of lane chunk c (32 K elements, 16 bytes of codes per row), as the pairs its
// nibbles j and j + 4 decode into, for j = 0..3:
//   format v1: elements 32c + 8w + j and 32c + 8w + j + 4 (one 16-byte load);
//   fragment order: elements k0 = (c / 4) * 128 + 2 (c % 4) + 8j + 32w and k0 + 1 (a 4-byte load each).
template <typename T, bool FRAG>
__device__ __forceinline__ void pair_activations(const T* arow, int c, int w, float2 ap[4]) {
  using Tr = Traits<T>;
  if constexpr (FRAG) {
    const T* a = arow + (c >> 2) * 128 + 2 * (c & 3) + 32 * w;
#pragma unroll
    for (int j = 0; j < 4; ++j) ap[j] = Tr::to_f2(*reinterpret_cast<const uint32_t*>(a + 8 * j));
  } else {
    const uint4 av = *reinterpret_cast<const uint4*>(arow + c * 32 + w * 8);
    const float2 e01 = Tr::to_f2(av.x), e23 = Tr::to_f2(av.y), e45 = Tr::to_f2(av.z), e67 = Tr::to_f2(av.w);
    ap[0] = make_float2(e01.x, e45.x);
    ap[1] = make_float2(e01.y, e45.y);
    ap[2] = make_float2(e23.x, e67.x);
    ap[3] = make_float2(e23.y, e67.y);
  }
}

// TOK rows (tokens of this expert) at a time; rows past the valid count repeat the last one
// and are not stored.
template <typename T, int TOK, bool FRAG>
__device__ __forceinline__ void process(const Args& p, const int* slots, int t0, int nvalid, int64_t w_off,
                                        int64_t s_off, int64_t z_off, bool has_zero, int group) {
  using Tr = Traits<T>;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = blockIdx.y * kRowsPerCta + warp * kRowsPerWarp;
  const int words_per_row = p.k / 8;
  const int ngroups = p.k / group;
  const int chunks = p.k / 32;

  const T* arow[TOK];
#pragma unroll
  for (int t = 0; t < TOK; ++t) {
    const int slot = slots[min(t0 + t, nvalid - 1)];
    arow[t] = reinterpret_cast<const T*>(p.a) + (int64_t)(slot / p.a_row_div) * p.stride_am;
  }
  float acc[TOK][kRowsPerWarp];
#pragma unroll
  for (int t = 0; t < TOK; ++t)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) acc[t][r] = 0.f;

  for (int c = lane; c < chunks; c += 32) {
    const int g = (c * 32) / group;
    uint4 wq[kRowsPerWarp];
    uint32_t zpair[kRowsPerWarp];
    float scale[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int n = min(n0 + r, p.n - 1);  // rows past N compute a copy of the last row, not stored
      wq[r] = *reinterpret_cast<const uint4*>(p.qweight + w_off + (int64_t)n * words_per_row + c * 4);
      const int64_t gi = (int64_t)n * ngroups + g;
      scale[r] = __half2float(p.scales[s_off + gi]);
      const float z = has_zero ? __half2float(p.zeros[z_off + gi]) : 8.f;
      zpair[r] = Tr::splat(Tr::kMagicF + z);
    }
    float part[TOK][kRowsPerWarp];
#pragma unroll
    for (int t = 0; t < TOK; ++t)
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) part[t][r] = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      // ap[t][j]: token t's activations for nibbles j and j + 4 of word w (pair_activations)
      float2 ap[TOK][4];
#pragma unroll
      for (int t = 0; t < TOK; ++t) pair_activations<T, FRAG>(arow[t], c, w, ap[t]);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const uint32_t word = w == 0 ? wq[r].x : w == 1 ? wq[r].y : w == 2 ? wq[r].z : wq[r].w;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          // nibbles j (bits 4j) and j + 4 (bits 4j + 16) -> (magic + q) pair -> exact (q - z) pair
          const uint32_t v = ((word >> (4 * j)) & 0x000f000fu) | Tr::kMagic;
          const float2 q = Tr::to_f2(Tr::sub(v, zpair[r]));
#pragma unroll
          for (int t = 0; t < TOK; ++t) {
            part[t][r] = fmaf(ap[t][j].x, q.x, part[t][r]);
            part[t][r] = fmaf(ap[t][j].y, q.y, part[t][r]);
          }
        }
      }
    }
#pragma unroll
    for (int t = 0; t < TOK; ++t)
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) acc[t][r] = fmaf(part[t][r], scale[r], acc[t][r]);
  }

#pragma unroll
  for (int t = 0; t < TOK; ++t)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      float v = acc[t][r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[t][r] = v;
    }
  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < TOK; ++t) {
      if (t0 + t >= nvalid) break;
      const int slot = slots[t0 + t];
      const float rw = p.routed_weights ? p.routed_weights[slot] : 1.f;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int n = n0 + r;
        if (n < p.n) reinterpret_cast<T*>(p.out)[(int64_t)slot * p.n + n] = Tr::from_f(acc[t][r] * rw);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32, 2) w4_gemv_kernel(Args p) {
  const int pid_m = blockIdx.x;
  if (pid_m >= *p.num_blocks) return;  // grid sized for the worst case
  const int e = p.block_expert[pid_m];
  const int64_t* m = p.meta + (int64_t)e * 6;
  const int group = (int)m[1];
  const bool has_zero = (m[2] & 1) != 0;
  const int64_t w_off = m[3], s_off = m[4], z_off = m[5];

  __shared__ int slots[kMaxBlockM];
  if (threadIdx.x < p.block_m) slots[threadIdx.x] = p.sorted_ids[(int64_t)pid_m * p.block_m + threadIdx.x];
  __syncthreads();
  int nvalid = 0;  // valid rows come first in a block (padding only at an expert's end)
  for (int i = 0; i < p.block_m; ++i) nvalid += slots[i] < p.num_slots;

  int t0 = 0;  // (4 tokens at a time spilled registers under the 128-register cap)
  if (m[2] & kFlagFragment) {
    for (; nvalid - t0 >= 2; t0 += 2) process<T, 2, true>(p, slots, t0, nvalid, w_off, s_off, z_off, has_zero, group);
    if (nvalid - t0 >= 1) process<T, 1, true>(p, slots, t0, nvalid, w_off, s_off, z_off, has_zero, group);
  } else {
    for (; nvalid - t0 >= 2; t0 += 2) process<T, 2, false>(p, slots, t0, nvalid, w_off, s_off, z_off, has_zero, group);
    if (nvalid - t0 >= 1) process<T, 1, false>(p, slots, t0, nvalid, w_off, s_off, z_off, has_zero, group);
  }
}

}  // namespace

// Returns a cudaError_t (0 = launched).
extern "C" int mxmoe_w4_gemv_launch(const void* a, int a_is_bf16, const int32_t* qweight, const void* scales,
                                    const void* zeros, const int64_t* meta, void* out, const float* routed_weights,
                                    const int32_t* sorted_ids, const int32_t* block_expert, const int32_t* num_blocks,
                                    int max_blocks, int n, int k, int num_slots, int a_row_div, int block_m,
                                    int64_t stride_am, cudaStream_t stream) {
  if (block_m > kMaxBlockM || k % 32 != 0) return (int)cudaErrorInvalidValue;
  Args p{a, qweight, reinterpret_cast<const __half*>(scales), reinterpret_cast<const __half*>(zeros), meta, out,
         routed_weights, sorted_ids, block_expert, num_blocks, n, k, num_slots, a_row_div, block_m, stride_am};
  dim3 grid(max_blocks, (n + kRowsPerCta - 1) / kRowsPerCta);
  if (a_is_bf16)
    w4_gemv_kernel<__nv_bfloat16><<<grid, kWarps * 32, 0, stream>>>(p);
  else
    w4_gemv_kernel<__half><<<grid, kWarps * 32, 0, stream>>>(p);
  return (int)cudaGetLastError();
}
