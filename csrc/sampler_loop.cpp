// featinv._sampler: the sampler loops (DDIM with eta = 0, DPM-Solver++(2M)) in C++ over libtorch.
// Python twins: featinv/sampling/ddim.py and dpmpp.py; the arithmetic is the same, op for op, so the
// results agree to float rounding. The denoiser is any callable (x, t) -> eps: an eager Python
// function, or a native engine (a replayed CUDA graph) wrapped the same way; the loop itself runs no
// Python. An optional callback sees each step, as the Python loops' does.
#include <pybind11/functional.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <array>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace featinv {

using Denoise = std::function<torch::Tensor(const torch::Tensor&, int64_t)>;
using Callback = std::function<void(int64_t, int64_t, const torch::Tensor&, const torch::Tensor&)>;

torch::Tensor sample_loop(const std::string& sampler, torch::Tensor x, const std::vector<int64_t>& timesteps,
                          const std::vector<std::vector<double>>& coefficients, const Denoise& denoise,
                          const std::optional<Callback>& callback) {
  if (timesteps.size() != coefficients.size()) {
    throw std::invalid_argument("timesteps and coefficients must have one entry per step");
  }
  const bool ddim = sampler == "ddim";
  if (!ddim && sampler != "dpmpp_2m") {
    throw std::invalid_argument("sampler must be ddim or dpmpp_2m, got " + sampler);
  }
  torch::NoGradGuard no_grad;
  torch::Tensor x0_prev;
  for (size_t i = 0; i < timesteps.size(); ++i) {
    const auto& k = coefficients[i];
    if (k.size() != 5) throw std::invalid_argument("each coefficient row must have 5 values");
    const int64_t t = timesteps[i];
    torch::Tensor eps;
    {
      eps = denoise(x, t);
    }
    torch::Tensor x0;
    torch::Tensor next;
    if (ddim) {
      if (k[4] != 0.0) throw std::invalid_argument("the C++ DDIM loop is deterministic (eta = 0)");
      x0 = (x - k[0] * eps) / k[1];
      next = k[2] * x0 + k[3] * eps;
    } else {
      x0 = k[0] * x + k[1] * eps;
      next = k[2] * x + k[3] * x0;
      if (k[4] != 0.0) next = next + k[4] * x0_prev;
    }
    if (callback) (*callback)(static_cast<int64_t>(i), t, next, x0);
    x0_prev = x0;
    x = next;
  }
  return x;
}

}  // namespace featinv

PYBIND11_MODULE(_sampler, m) {
  m.doc() = "featinv native sampler loops (libtorch).";
#ifdef FEATINV_TORCH_VERSION
  m.attr("built_with_torch") = FEATINV_TORCH_VERSION;  // checked at import against the running torch
#endif
  m.def("sample_loop", &featinv::sample_loop, py::arg("sampler"), py::arg("x"), py::arg("timesteps"),
        py::arg("coefficients"), py::arg("denoise"), py::arg("callback") = py::none());
}
