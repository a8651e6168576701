// Python bindings of kernels.cu: the same names and arguments as reference.py, keywords included.
#include <torch/extension.h>

#include "kernels.cuh"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prism's sub-expert MoE CUDA kernels (see prism_cli/cuda/reference.py for the semantics)";
  m.def("sort_pairs", &prism::sort_pairs, "Group the (token, slot) pairs by sub-expert: (order, offsets).",
        py::arg("indices"), py::arg("num_groups"));
  m.def("grouped_swiglu", &prism::grouped_swiglu, "SwiGLU up-projection of every sorted pair.", py::arg("x"),
        py::arg("gate_up"), py::arg("order"), py::arg("offsets"), py::arg("slots"));
  m.def("grouped_down", &prism::grouped_down, "Weighted down-projection, reduced over slots in order.",
        py::arg("act"), py::arg("down"), py::arg("order"), py::arg("offsets"), py::arg("weights"),
        py::arg("num_tokens"));
  m.def("experts_forward", &prism::experts_forward, "The whole sub-expert MoE step.", py::arg("x"),
        py::arg("gate_up"), py::arg("down"), py::arg("indices"), py::arg("weights"));
  m.def("gate_scores", &prism::gate_scores, "Training-free gate: sub-expert scores from gate neurons.",
        py::arg("x"), py::arg("gate_w"), py::arg("up_w"), py::arg("expert_idx"), py::arg("n_sub"));
}
