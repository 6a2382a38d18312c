// featinv._graph_loop: replays a captured denoising-step CUDA graph once per sampler step, from C++.
// The graph (torch.cuda.CUDAGraph, captured in Python by featinv/engine/fast.py) reads the
// timestep and the update coefficients from device tables at a device step index and increments
// that index itself, so the loop is: zero the index, replay N times. No Python runs between steps.
// Built on first use with torch.utils.cpp_extension (it needs the CUDA headers of a GPU machine);
// the Python twin is the loop in StepGraph.run.
#include <ATen/cuda/CUDAGraph.h>
#include <torch/extension.h>

namespace py = pybind11;

namespace featinv {

void replay_steps(py::object graph, torch::Tensor step_index, int64_t steps) {
  // torch.cuda.CUDAGraph derives from torch._C._CUDAGraph, pybind11's binding of at::cuda::CUDAGraph;
  // torch's extension flags make this module share torch's pybind11 type registry.
  auto& captured = graph.cast<at::cuda::CUDAGraph&>();
  if (steps < 0) throw std::invalid_argument("steps must be >= 0");
  step_index.zero_();
  py::gil_scoped_release no_gil;
  for (int64_t i = 0; i < steps; ++i) captured.replay();
}

}  // namespace featinv

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "featinv: replay a captured step graph N times from C++";
  m.def("replay_steps", &featinv::replay_steps, py::arg("graph"), py::arg("step_index"), py::arg("steps"));
}
