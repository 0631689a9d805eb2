// useg/core/backend.hpp — backend tags and the policy contract.
//
// A backend is an empty tag type B with `using scalar = ...`. Each backend provides:
//   - context<B>: threads or stream, library handles, a reusable workspace;
//   - ops<B>: a set of non-template static functions over raw pointers and run-time
//     descriptors (memory, conv, batch norm, pooling, elementwise, losses, optimizers).
// Layers are written once against context<B>/ops<B>.
#pragma once
#include <type_traits>

namespace useg {

/// CPU backend (Eigen GEMM + OpenMP). Scalar: the element type (float for real use,
/// double for finite-difference gradient checks).
template <class Scalar>
struct cpu_backend {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "useg::cpu_backend<Scalar>: Scalar must be float or double");
  using scalar = Scalar;
  static constexpr bool on_device = false;
  static constexpr const char* name = "cpu";
};
/// The CPU backend in float32: what users train with.
using cpu = cpu_backend<float>;
/// The CPU backend in float64: used by the gradient-check tests.
using cpu_f64 = cpu_backend<double>;

/// CUDA backend (cuDNN/cuBLAS + useg kernels); defined in <useg/backend/cuda.hpp>.
struct cuda;

namespace detail {
template <class>
inline constexpr bool always_false = false;
}

/// Run-time state of a backend: threads/stream, handles, workspace. Specialized per backend.
template <class B>
struct context {
  static_assert(detail::always_false<B>,
                "useg::context<B>: unknown backend. Include <useg/backend/cpu.hpp> for useg::cpu, or "
                "<useg/backend/cuda.hpp> (in a translation unit compiled by nvcc) for useg::cuda.");
};

/// The backend's math: non-template static functions. Specialized per backend.
template <class B>
struct ops {
  static_assert(detail::always_false<B>,
                "useg::ops<B>: unknown backend. Include <useg/backend/cpu.hpp> for useg::cpu, or "
                "<useg/backend/cuda.hpp> (in a translation unit compiled by nvcc, linked to useg::cuda) "
                "for useg::cuda.");
};

namespace detail {
template <class B, class = void>
struct is_complete : std::false_type {};
template <class B>
struct is_complete<B, std::void_t<decltype(sizeof(B))>> : std::true_type {};
}  // namespace detail

template <class B>
struct is_backend : std::false_type {};
template <class S>
struct is_backend<cpu_backend<S>> : std::true_type {};
template <>
struct is_backend<cuda> : std::true_type {};

#define USEG_CHECK_BACKEND(B)                                                                      \
  static_assert(::useg::is_backend<B>::value,                                                      \
                "useg: the backend parameter must be a backend tag such as useg::cpu or useg::cuda"); \
  static_assert(!::useg::is_backend<B>::value || ::useg::detail::is_complete<B>::value,            \
                "useg: this backend is declared but not defined. Include <useg/backend/cuda.hpp> (in a " \
                "translation unit compiled by nvcc, linked to useg::cuda) to use useg::cuda")

}  // namespace useg
