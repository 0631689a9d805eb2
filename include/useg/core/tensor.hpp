// useg/core/tensor.hpp — owning tensors and non-owning views, parameterized by backend.
//
// tensor<B> owns B::scalar data in B's memory (host for cpu, device for cuda). It is move-only:
// copies are explicit (clone(), copy_from()), and moving data between backends goes through
// to_host()/from_host() so that no host<->device copy is ever hidden.
#pragma once
#include <cstddef>
#include <cstring>
#include <utility>
#include <vector>

#include "useg/core/backend.hpp"
#include "useg/core/error.hpp"
#include "useg/core/shape.hpp"

namespace useg {

/// A non-owning view: pointer + shape. Valid while the viewed storage lives.
template <class B>
struct tensor_view {
  using scalar = typename B::scalar;
  scalar* data = nullptr;
  useg::shape dims{};
  std::size_t size() const { return dims.numel(); }
};

/// An owning, contiguous, row-major tensor of B::scalar in B's memory.
template <class B>
class tensor {
  USEG_CHECK_BACKEND(B);

 public:
  using backend = B;
  using scalar = typename B::scalar;

  tensor() = default;
  explicit tensor(const useg::shape& s) { resize(s); }
  tensor(int n, int c, int h, int w) { resize(shape::nchw(n, c, h, w)); }
  ~tensor() { release(); }

  tensor(const tensor&) = delete;
  tensor& operator=(const tensor&) = delete;
  tensor(tensor&& o) noexcept : data_(o.data_), capacity_(o.capacity_), dims_(o.dims_) {
    o.data_ = nullptr;
    o.capacity_ = 0;
    o.dims_ = {};
  }
  tensor& operator=(tensor&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      capacity_ = std::exchange(o.capacity_, 0);
      dims_ = std::exchange(o.dims_, {});
    }
    return *this;
  }

  /// Change the shape. Storage is reused when it is large enough (no allocation in a
  /// steady-state training loop); contents are unspecified after a size change.
  void resize(const useg::shape& s) {
    const std::size_t n = s.numel();
    if (n > capacity_) {
      release();
      data_ = ops<B>::allocate(n);
      capacity_ = n;
    }
    dims_ = s;
  }
  void resize(int n, int c, int h, int w) { resize(shape::nchw(n, c, h, w)); }

  scalar* data() { return data_; }
  const scalar* data() const { return data_; }
  const useg::shape& dims() const { return dims_; }
  std::size_t size() const { return dims_.numel(); }
  bool empty() const { return size() == 0; }
  int rank() const { return dims_.rank; }
  int n() const { return dims_.n(); }
  int c() const { return dims_.c(); }
  int h() const { return dims_.h(); }
  int w() const { return dims_.w(); }

  tensor_view<B> view() { return {data_, dims_}; }

  /// Fill with a constant.
  void fill(scalar v) { ops<B>::fill(data_, size(), v); }
  /// Explicit deep copy on the same backend.
  tensor clone() const {
    tensor t(dims_);
    ops<B>::copy(t.data_, data_, size());
    return t;
  }
  /// Copy contents (and shape) from another tensor of the same backend.
  void copy_from(const tensor& o) {
    resize(o.dims_);
    ops<B>::copy(data_, o.data_, size());
  }
  /// Upload host data (size() elements). For cpu this is a memcpy.
  void upload(const scalar* host) { ops<B>::upload(data_, host, size()); }
  /// Download to host memory (size() elements).
  void download(scalar* host) const { ops<B>::download(host, data_, size()); }
  /// Copy to a host vector.
  std::vector<scalar> to_host() const {
    std::vector<scalar> v(size());
    download(v.data());
    return v;
  }
  /// Build from host data; the vector's size must match the shape.
  static tensor from_host(const useg::shape& s, const std::vector<scalar>& host) {
    if (host.size() != s.numel())
      throw shape_error("useg::tensor::from_host: " + std::to_string(host.size()) + " values for shape " +
                        s.str() + " (" + std::to_string(s.numel()) + " expected)");
    tensor t(s);
    t.upload(host.data());
    return t;
  }

 private:
  void release() noexcept {
    if (data_) ops<B>::deallocate(data_, capacity_);
    data_ = nullptr;
    capacity_ = 0;
  }
  scalar* data_ = nullptr;
  std::size_t capacity_ = 0;
  useg::shape dims_{};
};

/// Throw a shape_error unless t is rank 4 with the given channel count (channels < 0: any).
template <class B>
void require_nchw(const tensor<B>& t, int channels, const char* who) {
  if (t.rank() != 4)
    throw shape_error(std::string(who) + ": expected a rank-4 NCHW tensor, got rank " + std::to_string(t.rank()) +
                      " with shape " + t.dims().str());
  if (channels >= 0 && t.c() != channels)
    throw shape_error(std::string(who) + ": expected " + std::to_string(channels) + " channels, got " +
                      std::to_string(t.c()) + " (shape " + t.dims().str() + ")");
  if (t.size() == 0) throw shape_error(std::string(who) + ": empty input tensor " + t.dims().str());
}

}  // namespace useg
