// tests/gradcheck.hpp — finite-difference gradient checking in double precision.
//
// loss(θ, x) = Σ out ⊙ R for a fixed random R. The analytic gradients come from the module's
// backward(R); the numerical ones from central differences (step 1e-6). Each input is checked at
// sampled coordinates and along a random direction; each parameter tensor of the store along
// its own random direction and at two random coordinates.
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
  double roundoff = 1e-13;  ///< relative rounding error of one double-precision loss evaluation
  int redraws = 6;      ///< how often a sample that sits on a kink (ReLU, max-pool tie) is redrawn
  bool report = true;   ///< false: count mismatches without failing the test (for meta-tests)
};

/// |a - n| within atol (+ the finite difference's round-off bound, roundoff·|L|/h) + rtol·max(|a|, |n|).
inline bool close(double a, double n, const options& o, double fd_noise = 0) {
  return std::abs(a - n) <= o.atol + fd_noise + o.rtol * std::max(std::abs(a), std::abs(n));
}

/// forward(): runs the module on the current inputs/parameters and returns its output.
/// backward(gy): runs backward and returns the input gradients, in the order of `inputs`.
///
/// Each numerical derivative is taken with steps h and h/2; when the two disagree the sample
/// straddles a kink (ReLU, max-pool tie) and is redrawn; otherwise the Richardson extrapolation
/// (4·D(h/2) - D(h))/3 is compared with the analytic value. A sample that stays non-smooth
/// after every redraw fails. Returns the number of mismatches.
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

  int mismatches = 0, checks = 0;
  // Derivative of the loss along v (on data[0..n)) with step h; noise = its round-off bound.
  double noise = 0;
  auto fd = [&](double* data, const std::vector<std::size_t>& idx, const std::vector<double>& v, double h) {
    for (std::size_t k = 0; k < idx.size(); ++k) data[idx[k]] += h * v[k];
    const double lp = loss();
    for (std::size_t k = 0; k < idx.size(); ++k) data[idx[k]] -= 2 * h * v[k];
    const double lm = loss();
    for (std::size_t k = 0; k < idx.size(); ++k) data[idx[k]] += h * v[k];
    noise = std::max(noise, o.roundoff * std::max(std::abs(lp), std::abs(lm)) / h);
    return (lp - lm) / (2 * h);
  };
  // One sample: draw(idx, v) picks the support and direction; grad gives the analytic gradient.
  auto sample = [&](const std::string& where, double* data, const double* grad,
                    const std::function<void(std::vector<std::size_t>&, std::vector<double>&)>& draw) {
    std::vector<std::size_t> idx;
    std::vector<double> v;
    for (int attempt = 0; attempt <= o.redraws; ++attempt) {
      idx.clear();
      v.clear();
      draw(idx, v);
      double an = 0;
      for (std::size_t k = 0; k < idx.size(); ++k) an += v[k] * grad[idx[k]];
      noise = 0;
      const double d1 = fd(data, idx, v, o.eps), d2 = fd(data, idx, v, o.eps / 2);
      if (!close(d1, d2, o, noise) && attempt < o.redraws) continue;  // straddles a kink: redraw
      const double num = (4 * d2 - d1) / 3;
      ++checks;
      const bool ok = close(an, num, o, 2 * noise) && close(d1, d2, o, noise);
      if (!ok) ++mismatches;
      if (o.report) {
        INFO(what << ": " << where << " analytic=" << an << " numeric=" << num << " (h: " << d1 << ", h/2: " << d2
                  << ", round-off bound " << noise << ", attempt " << attempt << ")");
        CHECK(ok);
      }
      return;
    }
  };
  auto directional = [&](const std::string& where, double* data, std::size_t n, const double* grad) {
    sample(where + " (random direction)", data, grad, [&](std::vector<std::size_t>& idx, std::vector<double>& v) {
      for (std::size_t i = 0; i < n; ++i) {
        idx.push_back(i);
        v.push_back(g.uniform(-1, 1));
      }
    });
  };
  auto coordinate = [&](const std::string& where, double* data, std::size_t n, const double* grad, std::size_t fixed) {
    sample(where + " (coordinate)", data, grad, [&](std::vector<std::size_t>& idx, std::vector<double>& v) {
      idx.push_back(fixed < n ? fixed : g.below(n));
      v.push_back(1.0);
      fixed = n;  // a redraw picks a random coordinate
    });
  };

  for (std::size_t k = 0; k < inputs.size(); ++k) {
    T& x = *inputs[k];
    REQUIRE(ginc[k].size() == x.size());
    const std::string nm = "input " + std::to_string(k);
    const bool all = x.size() <= o.coords_per_input;
    const std::size_t count = all ? x.size() : o.coords_per_input;
    for (std::size_t j = 0; j < count; ++j) coordinate(nm, x.data(), x.size(), ginc[k].data(), all ? j : x.size());
    directional(nm, x.data(), x.size(), ginc[k].data());
  }
  if (store) {
    for (std::size_t e = 0; e < store->entries().size(); ++e) {
      const auto& en = store->entries()[e];
      if (en.kind != useg::entry_kind::parameter) continue;
      double* p = store->param(useg::param_ref{e});
      const double* gr = gp.data() + en.offset;
      directional(en.name, p, en.size(), gr);
      for (int j = 0; j < 2; ++j) coordinate(en.name, p, en.size(), gr, en.size());
    }
  }
  if (o.report) CHECK(checks > 0);
  return mismatches;
}

}  // namespace gc
