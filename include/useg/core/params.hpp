// useg/core/params.hpp — the flat parameter store a model owns.
//
// Every learnable parameter of a model lives in one contiguous buffer (and its gradient in a
// second one), in registration order, which is the PyTorch reference's state_dict order.
// Layers keep entry indices, never pointers, so the store may be (re)allocated freely, and
// two layer objects may share one entry (the recurrent block's shared convolution).
// Non-learnable state (BN running mean/var) lives in a second flat buffer, and integer
// counters (BN num_batches_tracked) on the host.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "useg/core/error.hpp"
#include "useg/core/rng.hpp"
#include "useg/core/tensor.hpp"

namespace useg {

enum class entry_kind { parameter, buffer, counter };
enum class init_kind {
  constant,         ///< every element = value
  kaiming_uniform,  ///< PyTorch conv default: U(-b, b), b = 1/sqrt(fan_in) (kaiming a=sqrt(5))
  fan_in_uniform    ///< PyTorch conv bias default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
};

/// One named tensor of the store.
struct param_entry {
  std::string name;           ///< PyTorch state_dict key, e.g. "Conv1.conv.0.weight"
  useg::shape dims;           ///< its shape
  entry_kind kind = entry_kind::parameter;
  std::size_t offset = 0;     ///< element offset into the flat buffer of its kind
  init_kind init = init_kind::constant;
  double value = 0;           ///< constant init value
  int fan_in = 1;             ///< for the uniform inits
  std::size_t size() const { return dims.numel(); }
};

/// Index of an entry in a param_store (cheap to copy, shared by aliasing layers).
struct param_ref {
  std::size_t index = static_cast<std::size_t>(-1);
  bool valid() const { return index != static_cast<std::size_t>(-1); }
};

template <class B>
class param_store {
 public:
  using scalar = typename B::scalar;

  param_store() = default;
  param_store(const param_store&) = delete;
  param_store& operator=(const param_store&) = delete;

  param_ref add_parameter(std::string name, const useg::shape& s, init_kind init, double value = 0, int fan_in = 1) {
    return add(std::move(name), s, entry_kind::parameter, init, value, fan_in);
  }
  param_ref add_buffer(std::string name, const useg::shape& s, double value) {
    return add(std::move(name), s, entry_kind::buffer, init_kind::constant, value, 1);
  }
  param_ref add_counter(std::string name) {
    return add(std::move(name), useg::shape{}, entry_kind::counter, init_kind::constant, 0, 1);
  }

  /// Allocate the flat buffers and initialize every entry, in registration order, from `seed`.
  void finalize(std::uint64_t seed) {
    params_.resize(useg::shape{static_cast<int>(n_params_)});
    grads_ = tensor<B>();  // allocated at the first gradient access (inference never needs it)
    buffers_.resize(useg::shape{static_cast<int>(n_buffers_)});
    counters_.assign(n_counters_, 0);
    reinitialize(seed);
    finalized_ = true;
  }
  /// Re-draw every parameter and reset buffers and counters, deterministically from `seed`.
  void reinitialize(std::uint64_t seed) {
    rng g(seed);
    std::vector<scalar> hp(n_params_), hb(n_buffers_);
    for (const auto& e : entries_) {
      scalar* dst = e.kind == entry_kind::parameter ? hp.data() + e.offset
                    : e.kind == entry_kind::buffer  ? hb.data() + e.offset
                                                    : nullptr;
      if (!dst) continue;
      const double bound = 1.0 / std::sqrt(static_cast<double>(e.fan_in > 0 ? e.fan_in : 1));
      for (std::size_t i = 0; i < e.size(); ++i) {
        switch (e.init) {
          case init_kind::constant: dst[i] = static_cast<scalar>(e.value); break;
          case init_kind::kaiming_uniform:
          case init_kind::fan_in_uniform: dst[i] = static_cast<scalar>(g.uniform(-bound, bound)); break;
        }
      }
    }
    if (n_params_) params_.upload(hp.data());
    if (n_buffers_) buffers_.upload(hb.data());
    if (has_grads()) grads_.fill(0);
    for (auto& c : counters_) c = 0;
  }

  bool finalized() const { return finalized_; }
  const std::vector<param_entry>& entries() const { return entries_; }
  const param_entry& entry(param_ref r) const { return entries_.at(r.index); }
  std::size_t num_parameters() const { return n_params_; }
  std::size_t num_buffers() const { return n_buffers_; }

  scalar* param(param_ref r) { return params_.data() + entries_[r.index].offset; }
  scalar* grad(param_ref r) { return flat_grads().data() + entries_[r.index].offset; }
  scalar* buffer(param_ref r) { return buffers_.data() + entries_[r.index].offset; }
  std::int64_t& counter(param_ref r) { return counters_[entries_[r.index].offset]; }
  std::int64_t counter(param_ref r) const { return counters_[entries_[r.index].offset]; }

  /// The flat buffers (what optimizers update).
  tensor<B>& flat_params() { return params_; }
  /// The gradient buffer, allocated (zeroed) on first use: a model used only for inference
  /// never holds one.
  tensor<B>& flat_grads() {
    if (!has_grads() && n_params_) {
      grads_.resize(useg::shape{static_cast<int>(n_params_)});
      grads_.fill(0);
    }
    return grads_;
  }
  /// Whether the gradient buffer exists yet (the const accessor below never allocates it).
  bool has_grads() const { return n_params_ && grads_.size() == n_params_; }
  tensor<B>& flat_buffers() { return buffers_; }
  const tensor<B>& flat_params() const { return params_; }
  const tensor<B>& flat_grads() const { return grads_; }
  const tensor<B>& flat_buffers() const { return buffers_; }
  std::vector<std::int64_t>& counters() { return counters_; }
  const std::vector<std::int64_t>& counters() const { return counters_; }

  void zero_grad() {
    if (n_params_) flat_grads().fill(0);
  }

  /// Train mode (batch statistics in BN) or eval mode (running statistics).
  bool training() const { return training_; }
  void set_training(bool on) { training_ = on; }

  /// Find an entry by name; returns an invalid ref when absent.
  param_ref find(const std::string& name) const {
    for (std::size_t i = 0; i < entries_.size(); ++i)
      if (entries_[i].name == name) return {i};
    return {};
  }

 private:
  param_ref add(std::string name, const useg::shape& s, entry_kind kind, init_kind init, double value, int fan_in) {
    if (finalized_) throw error("useg::param_store: cannot add '" + name + "' after finalize()");
    param_entry e;
    e.name = std::move(name);
    e.dims = s;
    e.kind = kind;
    e.init = init;
    e.value = value;
    e.fan_in = fan_in;
    switch (kind) {
      case entry_kind::parameter: e.offset = n_params_; n_params_ += e.size(); break;
      case entry_kind::buffer: e.offset = n_buffers_; n_buffers_ += e.size(); break;
      case entry_kind::counter: e.offset = n_counters_++; break;
    }
    entries_.push_back(std::move(e));
    return {entries_.size() - 1};
  }

  std::vector<param_entry> entries_;
  std::size_t n_params_ = 0, n_buffers_ = 0, n_counters_ = 0;
  tensor<B> params_, grads_, buffers_;
  std::vector<std::int64_t> counters_;
  bool training_ = true;
  bool finalized_ = false;
};

}  // namespace useg
