// Fused temperature / top-k / top-p sampling over the vocabulary, without sorting it.
//
// Shape legend: B rows (one CUDA block each), V vocabulary (49218 for DualTowerVLM).
//
// Op: dualtower::sample_logits(Tensor logits (B, V) fp32, Tensor uniforms (B,) fp32 in [0, 1),
//                              float temperature, int top_k, float top_p) -> Tensor (B,) int64
//
// Semantics (Hugging Face's, as in dualtower/generation/sampling.py):
//   temperature <= 0: greedy, the first index of the maximum (torch.argmax).
//   otherwise s = logits / temperature; top-k keeps s >= the k-th largest s (ties kept); top-p keeps the
//   tokens whose strictly-more-likely mass is < top_p (the token that crosses p is kept); then one token is
//   drawn from softmax(s) restricted to the kept set, by inverting the CDF (in index order) at u * mass.
//
// How, per row: floats map to order-preserving uint32 keys; the k-th largest key is found by a 4-pass
// radix select over 8-bit digits (256-bin count histograms in shared memory); the top-p boundary by the
// same radix descent over fixed-point probability-mass histograms; the draw by one block-wide prefix scan.
// About ten passes over a row that stays in L2, instead of a full sort. Integer histograms make every
// step deterministic: the same logits and uniforms always give the same tokens.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_scan.cuh>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <climits>
#include <cstdint>

namespace dualtower {
namespace {

constexpr int kThreads = 1024;
constexpr int kBins = 256;
constexpr int kWarps = kThreads / 32;

// Order-preserving map float -> uint32 (larger float, larger key). Adding +0.0f turns -0.0 into +0.0, so
// that the two zeros tie exactly as they do in PyTorch comparisons.
__device__ __forceinline__ uint32_t order_key(float value) {
  const uint32_t bits = __float_as_uint(value + 0.0f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Deterministic block-wide reduction (fixed tree); every thread gets the result.
template <typename Op>
__device__ float block_all_reduce(float value, Op op, float identity, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kWarps ? scratch[lane] : identity;
    for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
    if (lane == 0) scratch[0] = value;
  }
  __syncthreads();
  return scratch[0];
}

// Whether (a, index_a) ranks before (b, index_b) in torch.argmax's order: NaN above every number, then the
// larger value, then the smaller index. INT_MAX marks a thread that saw no element (vocab < kThreads), which
// ranks last, so that it cannot win over a row of -inf with a sentinel value.
__device__ __forceinline__ bool argmax_before(float a, int index_a, float b, int index_b) {
  if (index_a == INT_MAX || index_b == INT_MAX) return index_a < index_b;
  const bool a_nan = isnan(a), b_nan = isnan(b);
  if (a_nan != b_nan) return a_nan;
  if (a_nan || a == b) return index_a < index_b;
  return a > b;
}

// First index of the maximum, like torch.argmax (NaN counts as the maximum).
__device__ int64_t block_argmax(const float* row, int vocab, float* value_scratch, int* index_scratch) {
  float best = -INFINITY;
  int best_index = INT_MAX;
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const float v = row[i];
    if (argmax_before(v, i, best, best_index)) {
      best = v;
      best_index = i;
    }
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int other_index = __shfl_xor_sync(0xffffffffu, best_index, offset);
    if (argmax_before(other, other_index, best, best_index)) {
      best = other;
      best_index = other_index;
    }
  }
  if (lane == 0) {
    value_scratch[warp] = best;
    index_scratch[warp] = best_index;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      if (argmax_before(value_scratch[w], index_scratch[w], best, best_index)) {
        best = value_scratch[w];
        best_index = index_scratch[w];
      }
    }
    index_scratch[0] = best_index;
  }
  __syncthreads();
  return index_scratch[0];
}

struct RowView {
  const float* logits;
  int vocab;
  float temperature;
  __device__ float scaled(int i) const { return logits[i] / temperature; }
};

// Key of the k-th largest scaled logit: radix select, most significant digit first, on counts.
__device__ uint32_t kth_largest_key(const RowView& row, int k, unsigned int* hist, int* picked) {
  uint32_t prefix = 0, mask = 0;
  int remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < kBins; b += kThreads) hist[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < row.vocab; i += kThreads) {
      const uint32_t key = order_key(row.scaled(i));
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xFFu], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int above = 0, bin = 0;
      for (int b = kBins - 1; b >= 0; --b) {
        if (above + static_cast<int>(hist[b]) >= remaining) {
          bin = b;
          break;
        }
        above += hist[b];
      }
      picked[0] = bin;
      picked[1] = remaining - above;
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(picked[0]) << shift;
    mask |= 0xFFu << shift;
    remaining = picked[1];
    __syncthreads();  // picked and hist are rewritten by the next pass
  }
  return prefix;
}

// Probability masses in fixed point (units of 2^-32): integer atomics add in any order to the same sum, so
// the top-p boundary, unlike with float atomics, does not depend on thread timing. A row's total stays below
// 2^63 for any vocabulary under 2^31; masses below 2^-32 of the top token's count as zero.
__device__ __forceinline__ unsigned long long fixed_point_mass(float relative_probability) {
  return relative_probability > 0.0f ? __float2ull_rn(relative_probability * 4294967296.0f) : 0ull;
}

// Smallest kept key under top-p: the largest-to-smallest descent stops in the digit whose mass makes the
// running total (mass of strictly larger keys) reach top_p of the kept mass; keys in lower digits are all
// removed. The first pass histograms every kept token, so its bins also sum to the kept mass.
__device__ uint32_t top_p_key(const RowView& row, uint32_t floor_key, float row_max, float top_p,
                              unsigned long long* mass, unsigned long long* carried, int* picked) {
  uint32_t prefix = 0, mask = 0;
  unsigned long long above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < kBins; b += kThreads) mass[b] = 0ull;
    __syncthreads();
    for (int i = threadIdx.x; i < row.vocab; i += kThreads) {
      const float s = row.scaled(i);
      const uint32_t key = order_key(s);
      if (key >= floor_key && (key & mask) == prefix) {
        atomicAdd(&mass[(key >> shift) & 0xFFu], fixed_point_mass(expf(s - row_max)));
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      if (shift == 24) {
        unsigned long long kept = 0;
        for (int b = 0; b < kBins; ++b) kept += mass[b];
        carried[1] = kept;
      }
      const double target = static_cast<double>(top_p) * static_cast<double>(carried[1]);
      unsigned long long running = above;
      int bin = -1, lowest = -1;
      for (int b = kBins - 1; b >= 0; --b) {
        if (mass[b] == 0ull) continue;
        if (static_cast<double>(running + mass[b]) >= target) {
          bin = b;
          break;
        }
        running += mass[b];
        lowest = b;
      }
      if (bin < 0) {  // only when no kept token has mass: keep everything down to the last non-empty bin
        bin = lowest >= 0 ? lowest : 0;
        if (lowest >= 0) running -= mass[lowest];
      }
      picked[0] = bin;
      carried[0] = running;
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(picked[0]) << shift;
    mask |= 0xFFu << shift;
    above = carried[0];
    __syncthreads();
  }
  return prefix;
}

__global__ void __launch_bounds__(kThreads) sample_logits_kernel(const float* __restrict__ logits,
                                                                 const float* __restrict__ uniforms,
                                                                 int64_t* __restrict__ out, int vocab,
                                                                 float temperature, int top_k, float top_p) {
  using BlockScan = cub::BlockScan<float, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ unsigned int counts[kBins];
  __shared__ unsigned long long masses[kBins];
  __shared__ unsigned long long mass_scratch[2];  // running mass above the chosen bin; the row's kept mass
  __shared__ float scratch[kWarps];
  __shared__ int ints[kWarps];
  __shared__ int chosen;
  __shared__ int last_kept;

  const int64_t row_index = blockIdx.x;
  const float* row_logits = logits + row_index * vocab;
  if (temperature <= 0.0f) {
    const int64_t best = block_argmax(row_logits, vocab, scratch, ints);
    if (threadIdx.x == 0) out[row_index] = best;
    return;
  }

  const RowView row{row_logits, vocab, temperature};
  float local_max = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += kThreads) local_max = fmaxf(local_max, row.scaled(i));
  const float row_max = block_all_reduce(local_max, MaxOp{}, -INFINITY, scratch);

  uint32_t floor_key = 0;  // kept tokens have key >= floor_key
  if (top_k > 0 && top_k < vocab) floor_key = kth_largest_key(row, top_k, counts, ints);
  if (top_p < 1.0f) floor_key = top_p_key(row, floor_key, row_max, top_p, masses, mass_scratch, ints);

  // Inverse CDF in index order: each thread owns one contiguous chunk of the vocabulary.
  const int chunk = (vocab + kThreads - 1) / kThreads;
  const int begin = min(vocab, static_cast<int>(threadIdx.x) * chunk);
  const int end = min(vocab, begin + chunk);
  float local = 0.0f;
  int local_last = -1;
  for (int i = begin; i < end; ++i) {
    const float s = row.scaled(i);
    if (order_key(s) >= floor_key) {
      local += expf(s - row_max);
      local_last = i;
    }
  }
  if (threadIdx.x == 0) {
    chosen = INT_MAX;
    last_kept = -1;
  }
  __syncthreads();
  float before, total;
  BlockScan(scan_storage).ExclusiveSum(local, before, total);
  if (local_last >= 0) atomicMax(&last_kept, local_last);
  const float target = uniforms[row_index] * total;
  if (local > 0.0f && before <= target && target < before + local) {
    float running = before;
    int pick = local_last;
    for (int i = begin; i < end; ++i) {
      const float s = row.scaled(i);
      if (order_key(s) < floor_key) continue;
      running += expf(s - row_max);
      if (running > target) {
        pick = i;
        break;
      }
    }
    atomicMin(&chosen, pick);
  }
  __syncthreads();
  if (threadIdx.x == 0) out[row_index] = chosen != INT_MAX ? chosen : last_kept;
}

at::Tensor sample_logits(const at::Tensor& logits, const at::Tensor& uniforms, double temperature, int64_t top_k,
                         double top_p) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2, "sample_logits: logits must be a 2-D CUDA tensor");
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "sample_logits: logits must be float32");
  TORCH_CHECK(logits.size(1) > 0 && logits.size(1) < INT_MAX, "sample_logits: bad vocabulary size");
  const bool greedy = temperature <= 0.0;
  TORCH_CHECK(greedy || (top_p > 0.0 && top_p <= 1.0), "sample_logits: top_p must be in (0, 1]");
  if (!greedy) {
    TORCH_CHECK(uniforms.device() == logits.device() && uniforms.scalar_type() == at::kFloat &&
                    uniforms.numel() == logits.size(0),
                "sample_logits: uniforms must be a float32 tensor on the logits' device with one value per row");
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor rows = logits.contiguous();
  const at::Tensor draws = greedy ? rows : uniforms.contiguous();
  at::Tensor out = at::empty({rows.size(0)}, rows.options().dtype(at::kLong));
  if (rows.size(0) == 0) return out;
  const int clamped_k = static_cast<int>(std::min<int64_t>(std::max<int64_t>(top_k, 0), INT_MAX));
  sample_logits_kernel<<<rows.size(0), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      rows.data_ptr<float>(), draws.data_ptr<float>(), out.data_ptr<int64_t>(), static_cast<int>(rows.size(1)),
      static_cast<float>(temperature), clamped_k, static_cast<float>(top_p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

// A fragment, not TORCH_LIBRARY: the Python kernels register other ops in the same `dualtower` namespace.
TORCH_LIBRARY_FRAGMENT(dualtower, m) {
  m.def("sample_logits(Tensor logits, Tensor uniforms, float temperature, int top_k, float top_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(dualtower, CUDA, m) { m.impl("sample_logits", &sample_logits); }

}  // namespace dualtower
