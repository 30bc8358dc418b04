// Python binding of csrc/w4_gemv.cu (built by vllm_mxmoe/kernels/csrc_ext.py through
// torch.utils.cpp_extension.load; optional: the Triton kernels are the default path).
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

extern "C" int mxmoe_w4_gemv_launch(const void* a, int a_is_bf16, const int32_t* qweight, const void* scales,
                                    const void* zeros, const int64_t* meta, void* out, const float* routed_weights,
                                    const int32_t* sorted_ids, const int32_t* block_expert, const int32_t* num_blocks,
                                    int max_blocks, int n, int k, int num_slots, int a_row_div, int block_m,
                                    int64_t stride_am, cudaStream_t stream);

// out[slot, n] = A[slot // a_row_div] @ W_e[n]^T (x routed_weights[slot]) for every routed slot
// of a 4-bit weight-only layer; out [num_slots, N] (or [1, num_slots, N]) in A's dtype.
void w4_gemv(const torch::Tensor& a, const torch::Tensor& qweight, const torch::Tensor& scales,
             const torch::Tensor& zeros, const torch::Tensor& meta, torch::Tensor& out,
             const c10::optional<torch::Tensor>& routed_weights, const torch::Tensor& sorted_ids,
             const torch::Tensor& block_expert, const torch::Tensor& num_blocks, int64_t n, int64_t k,
             int64_t num_slots, int64_t a_row_div, int64_t block_m) {
  TORCH_CHECK(a.is_cuda() && a.dim() == 2 && a.stride(1) == 1 && a.size(1) == k, "w4_gemv: A must be [rows, K]");
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf, "w4_gemv: A must be bf16/fp16");
  TORCH_CHECK(a.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0,
              "w4_gemv: A rows must be 16-byte aligned");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && scales.scalar_type() == at::kHalf &&
                  zeros.scalar_type() == at::kHalf && meta.scalar_type() == at::kLong,
              "w4_gemv: weight buffers of kernels/layout.py expected");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == a.scalar_type() && out.numel() == num_slots * n,
              "w4_gemv: out must be a contiguous [num_slots, N] tensor in A's dtype");
  TORCH_CHECK(k % 32 == 0, "w4_gemv: K must be a multiple of 32");
  const float* rw = nullptr;
  if (routed_weights.has_value()) {
    TORCH_CHECK(routed_weights->scalar_type() == at::kFloat && routed_weights->is_contiguous(),
                "w4_gemv: routed_weights must be contiguous float32");
    rw = routed_weights->data_ptr<float>();
  }
  auto stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
  int err = mxmoe_w4_gemv_launch(a.data_ptr(), a.scalar_type() == at::kBFloat16, qweight.data_ptr<int32_t>(),
                                 scales.data_ptr(), zeros.data_ptr(), meta.data_ptr<int64_t>(), out.data_ptr(), rw,
                                 sorted_ids.data_ptr<int32_t>(), block_expert.data_ptr<int32_t>(),
                                 num_blocks.data_ptr<int32_t>(), (int)block_expert.numel(), (int)n, (int)k,
                                 (int)num_slots, (int)a_row_div, (int)block_m, a.stride(0), stream);
  TORCH_CHECK(err == 0, "w4_gemv: launch failed: ", cudaGetErrorString((cudaError_t)err));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("w4_gemv", &w4_gemv, "4-bit grouped GEMV (decode)"); }
