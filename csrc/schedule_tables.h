// Noise-schedule tables for featinv, in double precision.
//
// Every function here has a pure-Python twin in featinv/sampling/schedule_tables.py that
// performs the same floating-point operations in the same order; tests compare the two.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace featinv {

// Training betas, shape (num_train_timesteps,). schedule: linear | scaled_linear | squaredcos_cap_v2.
std::vector<double> betas(int64_t num_train_timesteps, double beta_start, double beta_end,
                          const std::string& schedule);

// Cumulative product of (1 - beta), shape (num_train_timesteps,).
std::vector<double> alphas_cumprod(const std::vector<double>& betas);

// DDIM inference timesteps, descending, as diffusers' DDIMScheduler.set_timesteps.
// spacing: leading | trailing | linspace.
std::vector<int64_t> ddim_timesteps(int64_t num_train_timesteps, int64_t num_steps,
                                    const std::string& spacing, int64_t steps_offset);

// DPM-Solver multistep timesteps, descending, as diffusers' DPMSolverMultistepScheduler.
std::vector<int64_t> dpmpp_timesteps(int64_t num_train_timesteps, int64_t num_steps,
                                     const std::string& spacing, int64_t steps_offset);

// DDIM update coefficients (Song et al. 2021, eq. 12), flattened (num_steps, 5), in the order of
// operations of diffusers' DDIMScheduler.step:
//   x0     = (x - sqrt(1 - a_t) * eps) / sqrt(a_t)
//   x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - std^2) * eps + std * z
// columns: sqrt(1 - a_t), sqrt(a_t), sqrt(a_prev), sqrt(1 - a_prev - std^2), std.
std::vector<double> ddim_coefficients(const std::vector<double>& alphas_cumprod,
                                      const std::vector<int64_t>& timesteps,
                                      int64_t num_train_timesteps, bool set_alpha_to_one, double eta);

// DPM-Solver++(2M) coefficients (Lu et al. 2022, Algorithm 2, midpoint form), flattened (num_steps, 5):
//   x0      = a_x * x + a_eps * eps                 (data prediction at this step)
//   x_next  = c_x * x + c_d0 * x0 + c_d1 * x0_prev  (x0_prev: previous step's data prediction)
// First step and final step (final sigma is zero) are first order, as in diffusers.
std::vector<double> dpmpp_2m_coefficients(const std::vector<double>& alphas_cumprod,
                                          const std::vector<int64_t>& timesteps);

}  // namespace featinv
