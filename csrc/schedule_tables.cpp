#include "schedule_tables.h"

#include <cfenv>
#include <cmath>
#include <stdexcept>

namespace featinv {
namespace {

constexpr double kPi = 3.14159265358979323846;

// numpy.linspace(start, stop, num) element i: start + i * step, the last one exactly stop.
double linspace_at(double start, double stop, int64_t num, int64_t i) {
  if (num == 1) return start;
  if (i == num - 1) return stop;
  const double step = (stop - start) / static_cast<double>(num - 1);
  return start + static_cast<double>(i) * step;
}

// numpy.round: round half to even.
int64_t round_half_even(double value) { return static_cast<int64_t>(std::nearbyint(value)); }

double cosine_alpha_bar(double t) {
  const double c = std::cos((t + 0.008) / 1.008 * kPi / 2.0);
  return c * c;
}

// alphas_cumprod[t], with an error naming t when it is outside the training range.
double alpha_at(const std::vector<double>& alphas_cumprod, int64_t t) {
  if (t < 0 || t >= static_cast<int64_t>(alphas_cumprod.size()))
    throw std::invalid_argument("timestep " + std::to_string(t) + " is outside [0, " +
                                std::to_string(alphas_cumprod.size()) + "); use fewer steps or another spacing");
  return alphas_cumprod[static_cast<size_t>(t)];
}

void require_positive(int64_t value, const char* name) {
  if (value < 1) throw std::invalid_argument(std::string(name) + " must be >= 1");
}

// numpy.arange(start, 0, -step) as doubles, rounded half to even.
std::vector<int64_t> trailing(int64_t start, double step, int64_t shift) {
  const double first = static_cast<double>(start);
  const auto length = static_cast<int64_t>(std::ceil((0.0 - first) / -step));
  const double delta = (first + -step) - first;
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(length));
  for (int64_t i = 0; i < length; ++i) {
    const double value = i == 0 ? first : first + static_cast<double>(i) * delta;
    out.push_back(round_half_even(value) + shift);
  }
  return out;
}

}  // namespace

std::vector<double> betas(int64_t num_train_timesteps, double beta_start, double beta_end,
                          const std::string& schedule) {
  require_positive(num_train_timesteps, "num_train_timesteps");
  std::vector<double> out(static_cast<size_t>(num_train_timesteps));
  for (int64_t i = 0; i < num_train_timesteps; ++i) {
    double beta;
    if (schedule == "linear") {
      beta = linspace_at(beta_start, beta_end, num_train_timesteps, i);
    } else if (schedule == "scaled_linear") {
      const double root = linspace_at(std::sqrt(beta_start), std::sqrt(beta_end), num_train_timesteps, i);
      beta = root * root;
    } else if (schedule == "squaredcos_cap_v2") {
      const double t1 = static_cast<double>(i) / static_cast<double>(num_train_timesteps);
      const double t2 = static_cast<double>(i + 1) / static_cast<double>(num_train_timesteps);
      beta = std::fmin(1.0 - cosine_alpha_bar(t2) / cosine_alpha_bar(t1), 0.999);
    } else {
      throw std::invalid_argument("beta_schedule must be linear, scaled_linear or squaredcos_cap_v2, got " +
                                  schedule);
    }
    out[static_cast<size_t>(i)] = beta;
  }
  return out;
}

std::vector<double> alphas_cumprod(const std::vector<double>& betas) {
  std::vector<double> out(betas.size());
  double product = 1.0;
  for (size_t i = 0; i < betas.size(); ++i) {
    product *= 1.0 - betas[i];
    out[i] = product;
  }
  return out;
}

std::vector<int64_t> ddim_timesteps(int64_t num_train_timesteps, int64_t num_steps, const std::string& spacing,
                                    int64_t steps_offset) {
  require_positive(num_steps, "num_steps");
  if (num_steps > num_train_timesteps) throw std::invalid_argument("num_steps must be <= num_train_timesteps");
  std::vector<int64_t> out;
  if (spacing == "leading") {
    const int64_t ratio = num_train_timesteps / num_steps;
    for (int64_t i = num_steps - 1; i >= 0; --i) out.push_back(i * ratio + steps_offset);
  } else if (spacing == "trailing") {
    out = trailing(num_train_timesteps, static_cast<double>(num_train_timesteps) / static_cast<double>(num_steps), -1);
  } else if (spacing == "linspace") {
    for (int64_t i = num_steps - 1; i >= 0; --i)
      out.push_back(round_half_even(linspace_at(0.0, static_cast<double>(num_train_timesteps - 1), num_steps, i)));
  } else {
    throw std::invalid_argument("timestep_spacing must be leading, trailing or linspace, got " + spacing);
  }
  return out;
}

std::vector<int64_t> dpmpp_timesteps(int64_t num_train_timesteps, int64_t num_steps, const std::string& spacing,
                                     int64_t steps_offset) {
  require_positive(num_steps, "num_steps");
  if (num_steps > num_train_timesteps) throw std::invalid_argument("num_steps must be <= num_train_timesteps");
  std::vector<int64_t> out;
  if (spacing == "linspace") {
    for (int64_t i = num_steps; i >= 1; --i)
      out.push_back(round_half_even(linspace_at(0.0, static_cast<double>(num_train_timesteps - 1), num_steps + 1, i)));
  } else if (spacing == "leading") {
    const int64_t ratio = num_train_timesteps / (num_steps + 1);
    for (int64_t i = num_steps; i >= 1; --i) out.push_back(i * ratio + steps_offset);
  } else if (spacing == "trailing") {
    out = trailing(num_train_timesteps, static_cast<double>(num_train_timesteps) / static_cast<double>(num_steps), -1);
  } else {
    throw std::invalid_argument("timestep_spacing must be leading, trailing or linspace, got " + spacing);
  }
  return out;
}

std::vector<double> ddim_coefficients(const std::vector<double>& alphas_cumprod, const std::vector<int64_t>& timesteps,
                                      int64_t num_train_timesteps, bool set_alpha_to_one, double eta) {
  if (alphas_cumprod.empty()) throw std::invalid_argument("alphas_cumprod must not be empty");
  if (timesteps.empty()) throw std::invalid_argument("timesteps must not be empty");
  const int64_t num_steps = static_cast<int64_t>(timesteps.size());
  const int64_t stride = num_train_timesteps / num_steps;
  const double final_alpha = set_alpha_to_one ? 1.0 : alphas_cumprod[0];
  std::vector<double> out;
  out.reserve(timesteps.size() * 5);
  for (const int64_t t : timesteps) {
    const int64_t prev = t - stride;
    const double a_t = alpha_at(alphas_cumprod, t);
    const double a_prev = prev >= 0 ? alpha_at(alphas_cumprod, prev) : final_alpha;
    const double variance = ((1.0 - a_prev) / (1.0 - a_t)) * (1.0 - a_t / a_prev);
    const double std_dev = eta * std::sqrt(variance);
    out.push_back(std::sqrt(1.0 - a_t));
    out.push_back(std::sqrt(a_t));
    out.push_back(std::sqrt(a_prev));
    out.push_back(std::sqrt(1.0 - a_prev - std_dev * std_dev));
    out.push_back(std_dev);
  }
  return out;
}

std::vector<double> dpmpp_2m_coefficients(const std::vector<double>& alphas_cumprod,
                                          const std::vector<int64_t>& timesteps) {
  const size_t n = timesteps.size();
  for (size_t i = 1; i < n; ++i)
    if (timesteps[i] >= timesteps[i - 1])
      throw std::invalid_argument("timesteps must be strictly decreasing; use fewer steps");
  // Variance-preserving (alpha, sigma) at each timestep, then the final (1, 0).
  std::vector<double> alpha(n + 1), sigma(n + 1), lambda(n + 1);
  for (size_t i = 0; i < n; ++i) {
    const double a = alpha_at(alphas_cumprod, timesteps[i]);
    const double ve_sigma = std::sqrt((1.0 - a) / a);
    alpha[i] = 1.0 / std::sqrt(ve_sigma * ve_sigma + 1.0);
    sigma[i] = ve_sigma * alpha[i];
    lambda[i] = std::log(alpha[i]) - std::log(sigma[i]);
  }
  alpha[n] = 1.0;
  sigma[n] = 0.0;
  std::vector<double> out;
  out.reserve(n * 5);
  for (size_t i = 0; i < n; ++i) {
    const bool final_step = i == n - 1;
    // exp(-h) with h = lambda_next - lambda_i; the final sigma is zero, so exp(-h) is zero there.
    const double exp_neg_h = final_step ? 0.0 : std::exp(-(lambda[i + 1] - lambda[i]));
    const double a_coef = -alpha[i + 1] * (exp_neg_h - 1.0);
    double c_d0 = a_coef, c_d1 = 0.0;
    if (i > 0 && !final_step) {
      const double r0 = (lambda[i] - lambda[i - 1]) / (lambda[i + 1] - lambda[i]);
      c_d0 = a_coef + 0.5 * a_coef / r0;
      c_d1 = -0.5 * a_coef / r0;
    }
    out.push_back(1.0 / alpha[i]);
    out.push_back(-sigma[i] / alpha[i]);
    out.push_back(sigma[i + 1] / sigma[i]);
    out.push_back(c_d0);
    out.push_back(c_d1);
  }
  return out;
}

}  // namespace featinv
