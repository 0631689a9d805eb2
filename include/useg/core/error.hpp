// useg/core/error.hpp — the exception hierarchy. Every error useg throws derives from useg::error.
#pragma once
#include <stdexcept>
#include <string>

namespace useg {

/// Base of every exception thrown by useg.
struct error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
/// A tensor of the wrong rank, channel count or size was given to a layer or model.
struct shape_error : error {
  using error::error;
};
/// A configuration value (width, depth, t, learning rate, ...) is out of range.
struct config_error : error {
  using error::error;
};
/// Reading or writing a file failed; the message names the file and the problem.
struct io_error : error {
  using error::error;
};
/// A backend call (CUDA, cuDNN, cuBLAS, allocation) failed.
struct backend_error : error {
  using error::error;
};

}  // namespace useg
