// Host API of kernels.cu: the compiled twins of the functions of reference.py (same names, arguments
// and results). Inputs are CUDA tensors: activations and weights bfloat16 or float16, contiguous,
// 16-byte aligned, with the hidden size and the sub-expert width multiples of 8; routing ids int64;
// routing weights float32, bfloat16 or float16. Matmuls accumulate in float32.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace prism {

// order [S] (flat pair ids grouped by sub-expert, stable, unused slots dropped), offsets [G + 1].
std::tuple<at::Tensor, at::Tensor> sort_pairs(const at::Tensor& indices, int64_t num_groups);

// act [S, Is]: silu(x Wg^T) * (x Wu^T) for each sorted pair.
at::Tensor grouped_swiglu(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& order,
                          const at::Tensor& offsets, int64_t slots);

// out [T, H]: sum over slots of weight * down(act), reduced in slot order.
at::Tensor grouped_down(const at::Tensor& act, const at::Tensor& down, const at::Tensor& order,
                        const at::Tensor& offsets, const at::Tensor& weights, int64_t num_tokens);

// The whole sub-expert MoE step, without any host synchronisation.
at::Tensor experts_forward(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                           const at::Tensor& indices, const at::Tensor& weights);

// scores [T, k, N] float32: mean |silu(g.x) (u.x)| over each sub-expert's gate neurons.
at::Tensor gate_scores(const at::Tensor& x, const at::Tensor& gate_w, const at::Tensor& up_w,
                       const at::Tensor& expert_idx, int64_t n_sub);

}  // namespace prism
