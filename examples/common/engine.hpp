// examples/common/engine.hpp — the compute device of the example programs (--device cpu|cuda).
//
// An engine holds a backend's context, the model and its optimizer: everything the programs do
// that touches the backend's memory. The program logic (lgg_train, lgg_eval, lgg_predict,
// lgg::evaluate) is written once against this interface and stays ordinary host code: data are
// read, augmented and batched on the host, batches go in as host arrays (uploaded with
// tensor::upload, an explicit host-to-device copy on useg::cuda), logits come back as host
// arrays, and checkpoints are written from host copies (useg::io downloads/uploads the flat
// parameter buffers).
//
// The implementation is one template, backend_engine<B> (engine_impl.hpp), instantiated for
// useg::cpu in engine_cpu.cpp and, in builds with the CUDA backend, for useg::cuda in
// engine_cuda.cu (nvcc; with the useg::cuda model families it forms the module lgg_cuda.so, loaded
// only for --device cuda). Only those translation units and the model families see backend code,
// so nvcc never has to parse CLI11, xtensor or libtiff.
#pragma once
#include <cstddef>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model_registry.hpp"
#include "useg/loss/losses.hpp"

namespace lgg {

/// The --device values.
inline const std::vector<std::string>& device_names() {
  static const std::vector<std::string> n{"cpu", "cuda"};
  return n;
}
/// True when this program was built with the CUDA backend (--device cuda can work).
bool built_with_cuda();

/// The optimizer of a training run.
struct optimizer_spec {
  std::string name = "adam";  ///< adam, adamw or sgd
  double lr = 1e-3, momentum = 0.9, weight_decay = 0;
};

class engine {
 public:
  virtual ~engine() = default;
  /// "cpu" or "cuda".
  virtual const char* device() const = 0;
  /// E.g. "cpu, 4 threads" or "cuda device 0 (NVIDIA H100 80GB HBM3, 132 SMs, 79.1 GiB)".
  virtual std::string device_info() const = 0;
  /// Threads for host-side work (loading slices): the compute threads on cpu.
  virtual int host_threads() const = 0;

  /// Build the model (replacing any previous model and optimizer).
  virtual void build_model(const model_spec& s) = 0;
  virtual std::string summary() const = 0;
  virtual std::size_t num_parameters() const = 0;
  virtual const char* reference_name() const = 0;
  virtual void train(bool on) = 0;

  /// useg::io::load_weights / save_weights on the model's parameter store.
  virtual void load_weights(const std::string& path) = 0;
  virtual void save_weights(const std::string& path, const std::map<std::string, std::string>& metadata) = 0;

  /// Create the optimizer over the model's parameters.
  virtual void make_optimizer(const optimizer_spec& o) = 0;
  virtual void set_lr(double lr) = 0;
  /// useg::io::save_training_state / load_training_state with the optimizer.
  virtual void save_training_state(const std::string& path, const nlohmann::json& extra) = 0;
  virtual nlohmann::json load_training_state(const std::string& path) = 0;

  /// One training step on a host batch x (n, c, h, w) and masks y (n, 1, h, w): upload, zero_grad,
  /// forward, loss; then, when the loss is finite, backward and an optimizer step. Returns the loss.
  virtual double train_step(const float* x, const float* y, int n, int c, int h, int w, const useg::loss_options& loss) = 0;
  /// Eval-mode inference (the model's predict()) on a host batch; the logits (n, 1, h, w) are
  /// copied to `logits`. Returns the loss against y.
  virtual double predict(const float* x, const float* y, int n, int c, int h, int w, const useg::loss_options& loss,
                         std::vector<float>& logits) = 0;
};

/// The engine for --device `device`. threads: compute threads on cpu (0: all cores); on cuda, the
/// host threads for loading (0: all cores). Throws useg::config_error for an unknown device or
/// for cuda in a build without the CUDA backend, and a useg::backend_error when no GPU is usable.
std::unique_ptr<engine> make_engine(const std::string& device, int threads);

/// Per backend (engine_cpu.cpp; engine_cuda.cu, in the module lgg_cuda.so).
std::unique_ptr<engine> make_cpu_engine(int threads);
std::unique_ptr<engine> make_cuda_engine(int threads);

}  // namespace lgg
