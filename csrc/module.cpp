// featinv._C: the private native module (pybind11). Python twin: featinv/sampling/schedule_tables.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "schedule_tables.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "featinv native code: noise-schedule tables in double precision.";
  m.def("betas", &featinv::betas, py::arg("num_train_timesteps"), py::arg("beta_start"), py::arg("beta_end"),
        py::arg("schedule"));
  m.def("alphas_cumprod", &featinv::alphas_cumprod, py::arg("betas"));
  m.def("ddim_timesteps", &featinv::ddim_timesteps, py::arg("num_train_timesteps"), py::arg("num_steps"),
        py::arg("spacing"), py::arg("steps_offset"));
  m.def("dpmpp_timesteps", &featinv::dpmpp_timesteps, py::arg("num_train_timesteps"), py::arg("num_steps"),
        py::arg("spacing"), py::arg("steps_offset"));
  m.def("ddim_coefficients", &featinv::ddim_coefficients, py::arg("alphas_cumprod"), py::arg("timesteps"),
        py::arg("num_train_timesteps"), py::arg("set_alpha_to_one"), py::arg("eta"));
  m.def("dpmpp_2m_coefficients", &featinv::dpmpp_2m_coefficients, py::arg("alphas_cumprod"),
        py::arg("timesteps"));
}
