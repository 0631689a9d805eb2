// tests/gradcheck.hpp — finite-difference gradient checking in double precision.
//
// loss(θ, x) = Σ out ⊙ R for a fixed random R. The analytic gradients come from the module's
// backward(R); the numerical ones from central differences (step 1e-6). Each input is checked at
// sampled coordinates and along a random direction; each parameter tensor of the store along
// its own random direction and at two coordinates.
#pragma once
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "useg/backend/cpu.hpp"
#include "useg/core/params.hpp"
#include "useg/core/rng.hpp"
#include "useg/core/tensor.hpp"

namespace gc {

using B = useg::cpu_f64;
using T = useg::tensor<B>;

inline void fill_random(T& t, useg::rng& g, double lo = -1, double hi = 1) {
  for (std::size_t i = 0; i < t.size(); ++i) t.data()[i] = g.uniform(lo, hi);
}
inline T random_tensor(const useg::shape& s, useg::rng& g, double lo = -1, double hi = 1) {
  T t(s);
  fill_random(t, g, lo, hi);
  return t;
}

struct options {
  double eps = 1e-6;
  double rtol = 1e-5;
  double atol = 1e-6;
  std::size_t coords_per_input = 24;
  std::uint64_t seed = 1234;
};

inline bool close(double a, double n, const options& o) {
  return std::abs(a - n) <= o.atol + o.rtol * std::max(std::abs(a), std::abs(n));
}

/// forward(): runs the module on the current inputs/parameters and returns its output.
/// backward(gy): runs backward and returns the input gradients, in the order of `inputs`.
/// Returns the number of individual comparisons made (each also a doctest CHECK).
inline int check(const std::string& what, const std::function<const T&()>& forward,
                 const std::function<std::vector<const T*>(const T&)>& backward, const std::vector<T*>& inputs,
                 useg::param_store<B>* store, options o = {}) {
  useg::rng g(o.seed);
  const T& out0 = forward();
  T R = random_tensor(out0.dims(), g);
  auto loss = [&]() {
    const T& out = forward();
    double s = 0;
    for (std::size_t i = 0; i < out.size(); ++i) s += out.data()[i] * R.data()[i];
    return s;
  };
  if (store) store->zero_grad();
  forward();
  std::vector<const T*> gin = backward(R);
  REQUIRE(gin.size() == inputs.size());
  std::vector<std::vector<double>> ginc;
  for (const T* t : gin) ginc.emplace_back(t->data(), t->data() + t->size());
  std::vector<double> gp;
  if (store) gp.assign(store->flat_grads().data(), store->flat_grads().data() + store->num_parameters());

  int checks = 0;
  auto compare = [&](const std::string& where, double analytic, double numeric) {
    INFO(what << ": " << where << " analytic=" << analytic << " numeric=" << numeric);
    CHECK(close(analytic, numeric, o));
    ++checks;
  };
  // directional derivative along v on data[0..n)
  auto directional = [&](double* data, std::size_t n, const double* grad, const std::string& where) {
    std::vector<double> v(n);
    double an = 0;
    for (std::size_t i = 0; i < n; ++i) {
      v[i] = g.uniform(-1, 1);
      an += v[i] * grad[i];
    }
    for (std::size_t i = 0; i < n; ++i) data[i] += o.eps * v[i];
    const double lp = loss();
    for (std::size_t i = 0; i < n; ++i) data[i] -= 2 * o.eps * v[i];
    const double lm = loss();
    for (std::size_t i = 0; i < n; ++i) data[i] += o.eps * v[i];
    compare(where + " (random direction)", an, (lp - lm) / (2 * o.eps));
  };
  auto coordinate = [&](double* data, std::size_t i, double grad, const std::string& where) {
    const double keep = data[i];
    data[i] = keep + o.eps;
    const double lp = loss();
    data[i] = keep - o.eps;
    const double lm = loss();
    data[i] = keep;
    compare(where + "[" + std::to_string(i) + "]", grad, (lp - lm) / (2 * o.eps));
  };

  for (std::size_t k = 0; k < inputs.size(); ++k) {
    T& x = *inputs[k];
    REQUIRE(ginc[k].size() == x.size());
    const std::string nm = "input " + std::to_string(k);
    if (x.size() <= o.coords_per_input) {
      for (std::size_t i = 0; i < x.size(); ++i) coordinate(x.data(), i, ginc[k][i], nm);
    } else {
      for (std::size_t j = 0; j < o.coords_per_input; ++j) {
        const std::size_t i = g.below(x.size());
        coordinate(x.data(), i, ginc[k][i], nm);
      }
    }
    directional(x.data(), x.size(), ginc[k].data(), nm);
  }
  if (store) {
    for (std::size_t e = 0; e < store->entries().size(); ++e) {
      const auto& en = store->entries()[e];
      if (en.kind != useg::entry_kind::parameter) continue;
      double* p = store->param(useg::param_ref{e});
      const double* gr = gp.data() + en.offset;
      directional(p, en.size(), gr, en.name);
      for (int j = 0; j < 2; ++j) {
        const std::size_t i = g.below(en.size());
        coordinate(p, i, gr[i], en.name);
      }
    }
  }
  return checks;
}

}  // namespace gc
