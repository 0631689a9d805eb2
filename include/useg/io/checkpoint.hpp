// useg/io/checkpoint.hpp — model weights and training state in safetensors files.
//
// Weights: every entry of a model's param_store under its name, which is the PyTorch state_dict
// key of the reference model (see the README's name mapping), so the file loads into the PyTorch
// model with load_state_dict(strict=True) and a PyTorch state_dict saved as safetensors loads here.
// Parameters and BN running statistics are stored in the backend's scalar type (F32 for useg::cpu
// and useg::cuda, F64 for useg::cpu_f64), num_batches_tracked as an I64 scalar (shape []).
//
// Training state (a separate file, e.g. last.state.safetensors): the optimizer's state tensors
// (exp_avg, exp_avg_sq, momentum_buffer, each flat), and in the metadata its name, step count,
// learning rate and a JSON blob of anything else the program needs (epoch, RNG, scheduler, args).
//
// All data moves through tensor download()/upload(), so this works for every backend.
#pragma once
#include <charconv>
#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "useg/core/error.hpp"
#include "useg/core/params.hpp"
#include "useg/io/safetensors.hpp"
#include "useg/optim/optimizers.hpp"

namespace useg::io {

namespace detail {
/// The file shape of a store entry: its dims, or [] for a counter.
inline std::vector<std::int64_t> file_shape(const param_entry& e) {
  std::vector<std::int64_t> s;
  if (e.kind == entry_kind::counter) return s;
  for (int i = 0; i < e.dims.rank; ++i) s.push_back(e.dims[i]);
  return s;
}

inline std::string problem_report(const std::string& who, const std::string& path, const std::string& what,
                                  const std::vector<std::string>& problems) {
  std::string msg = who + ": '" + path + "' does not match " + what + ": " + std::to_string(problems.size()) +
                    (problems.size() == 1 ? " problem" : " problems");
  for (const auto& p : problems) msg += "\n  " + p;
  return msg;
}

/// The weights file of a store, from host copies of its flat buffers. T: float or double.
template <class T>
safetensors make_weights_file(const std::vector<param_entry>& entries, const std::vector<T>& params,
                              const std::vector<T>& buffers, const std::vector<std::int64_t>& counters,
                              const std::map<std::string, std::string>& metadata) {
  safetensors st;
  st.metadata = metadata;
  for (const auto& e : entries) {
    switch (e.kind) {
      case entry_kind::parameter:
        st.add(e.name, stored_tensor::from_values<T>(file_shape(e), params.data() + e.offset, e.size()));
        break;
      case entry_kind::buffer:
        st.add(e.name, stored_tensor::from_values<T>(file_shape(e), buffers.data() + e.offset, e.size()));
        break;
      case entry_kind::counter:
        st.add(e.name, stored_tensor::from_values<std::int64_t>({}, counters.data() + e.offset, 1));
        break;
    }
  }
  return st;
}

/// Check every entry against the file (all problems in one io_error), then copy the values into
/// the host buffers. Nothing is written unless everything matches.
template <class T>
void fill_from_weights_file(const safetensors& f, const std::string& path, const std::vector<param_entry>& entries,
                            std::vector<T>& params, std::vector<T>& buffers, std::vector<std::int64_t>& counters) {
  const char* model_dtype = to_string(dtype_of<T>());
  std::vector<std::string> problems;
  std::unordered_map<std::string, bool> known;
  for (const auto& e : entries) {
    known.emplace(e.name, true);
    const auto want = file_shape(e);
    const bool counter = e.kind == entry_kind::counter;
    const stored_tensor* t = f.find(e.name);
    if (!t) {
      problems.push_back("missing: " + e.name + " (model: " + (counter ? "I64" : model_dtype) + " " + shape_str(want) + ")");
      continue;
    }
    if (counter ? !is_integer(t->type) : !is_floating(t->type))
      problems.push_back("wrong dtype: " + e.name + " (file: " + to_string(t->type) + ", model: " +
                         (counter ? "I64 (an integer dtype)" : std::string(model_dtype) + " (F16, BF16, F32 or F64 accepted)") + ")");
    if (t->shape != want)
      problems.push_back("wrong shape: " + e.name + " (file: " + shape_str(t->shape) + ", model: " + shape_str(want) + ")");
  }
  for (const auto& [name, t] : f.tensors())
    if (!known.count(name))
      problems.push_back("unexpected: " + name + " (file: " + to_string(t.type) + " " + shape_str(t.shape) + ")");
  if (!problems.empty()) throw io_error(problem_report("useg::io::load_weights", path, "the model", problems));

  for (const auto& e : entries) {
    const stored_tensor& t = *f.find(e.name);
    const std::string what = "tensor '" + e.name + "' of '" + path + "'";
    if (e.kind == entry_kind::counter) {
      counters[e.offset] = t.to_int64(what)[0];
    } else {
      const auto v = t.to_floating<T>(what);
      std::copy(v.begin(), v.end(), (e.kind == entry_kind::parameter ? params : buffers).begin() + static_cast<std::ptrdiff_t>(e.offset));
    }
  }
}

inline std::string format_double(double v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}
}  // namespace detail

/// Write all entries of `store` (parameters, BN buffers, counters) under their names (= PyTorch
/// state_dict keys) to `path`, atomically (temporary file in the same directory, fsync, rename).
/// `metadata` goes to the file's "__metadata__".
template <class B>
void save_weights(const std::string& path, param_store<B>& store, const std::map<std::string, std::string>& metadata = {}) {
  using T = typename B::scalar;
  if (!store.finalized()) throw error("useg::io::save_weights: the parameter store is not finalized");
  std::vector<T> params(store.num_parameters()), buffers(store.num_buffers());
  if (!params.empty()) store.flat_params().download(params.data());
  if (!buffers.empty()) store.flat_buffers().download(buffers.data());
  write_safetensors(path, detail::make_weights_file<T>(store.entries(), params, buffers, store.counters(), metadata));
}

/// Load weights written by save_weights or by PyTorch (a state_dict saved as safetensors). Every
/// name, shape and dtype is checked first; all problems (missing, unexpected, wrong shape, wrong
/// dtype) are reported together in one io_error naming the file, and the store is left untouched.
/// Floating-point entries accept F32, F64, F16 and BF16 (converted); counters any integer dtype.
template <class B>
void load_weights(const std::string& path, param_store<B>& store) {
  using T = typename B::scalar;
  if (!store.finalized()) throw error("useg::io::load_weights: the parameter store is not finalized");
  const safetensors f = read_safetensors(path);
  std::vector<T> params(store.num_parameters()), buffers(store.num_buffers());
  if (!params.empty()) store.flat_params().download(params.data());
  if (!buffers.empty()) store.flat_buffers().download(buffers.data());
  std::vector<std::int64_t> counters = store.counters();
  detail::fill_from_weights_file<T>(f, path, store.entries(), params, buffers, counters);
  if (!params.empty()) store.flat_params().upload(params.data());
  if (!buffers.empty()) store.flat_buffers().upload(buffers.data());
  store.counters() = std::move(counters);
}

/// The "__metadata__" map of a safetensors file (the header is validated; the data is not read).
inline std::map<std::string, std::string> read_metadata(const std::string& path) { return read_safetensors_header(path).metadata; }

/// Save the optimizer's state tensors, step count and learning rate, plus `extra` (any JSON: epoch,
/// RNG state, scheduler state, program arguments), to `path` atomically.
template <class B>
void save_training_state(const std::string& path, optimizer<B>& opt, const nlohmann::json& extra) {
  safetensors st;
  for (auto& [name, t] : opt.state()) {
    const auto host = t->to_host();
    st.add(name, {static_cast<std::int64_t>(host.size())}, host);
  }
  st.metadata["useg.kind"] = "training_state";
  st.metadata["useg.optimizer"] = opt.name();
  st.metadata["useg.steps"] = std::to_string(opt.steps());
  st.metadata["useg.lr"] = detail::format_double(opt.lr());
  try {
    st.metadata["useg.extra"] = extra.dump();
  } catch (const nlohmann::json::exception& e) {
    throw io_error("useg::io::save_training_state: cannot encode the extra state for '" + path + "': " + e.what());
  }
  write_safetensors(path, st);
}

/// Restore what save_training_state wrote into `opt` (state tensors, step count, learning rate)
/// and return the extra JSON. Everything is checked before `opt` changes: an optimizer of another
/// kind or size gives an io_error naming the file and each problem.
template <class B>
nlohmann::json load_training_state(const std::string& path, optimizer<B>& opt) {
  using T = typename B::scalar;
  const safetensors f = read_safetensors(path);
  const std::string who = "useg::io::load_training_state";
  auto meta = [&](const char* key) -> const std::string& {
    auto it = f.metadata.find(key);
    if (it == f.metadata.end())
      throw io_error(who + ": '" + path + "' is not a useg training-state file (no \"" + key + "\" in its metadata)");
    return it->second;
  };
  if (meta("useg.optimizer") != opt.name())
    throw io_error(who + ": '" + path + "' holds the state of a '" + meta("useg.optimizer") + "' optimizer, not of '" +
                   opt.name() + "'");
  const std::string& steps_s = meta("useg.steps");
  const std::string& lr_s = meta("useg.lr");
  std::int64_t steps = 0;
  double lr = 0;
  if (auto r = std::from_chars(steps_s.data(), steps_s.data() + steps_s.size(), steps); r.ec != std::errc{} || r.ptr != steps_s.data() + steps_s.size() || steps < 0)
    throw io_error(who + ": '" + path + "': useg.steps is \"" + steps_s + "\", not a step count");
  if (auto r = std::from_chars(lr_s.data(), lr_s.data() + lr_s.size(), lr); r.ec != std::errc{} || r.ptr != lr_s.data() + lr_s.size() || !(lr >= 0))
    throw io_error(who + ": '" + path + "': useg.lr is \"" + lr_s + "\", not a learning rate");
  nlohmann::json extra;
  try {
    extra = nlohmann::json::parse(meta("useg.extra"));
  } catch (const nlohmann::json::exception& e) {
    throw io_error(who + ": '" + path + "': useg.extra is not valid JSON (" + e.what() + ")");
  }

  auto state = opt.state();
  std::vector<std::string> problems;
  std::map<std::string, bool> known;
  for (auto& [name, t] : state) {
    known[name] = true;
    const stored_tensor* s = f.find(name);
    const std::vector<std::int64_t> want{static_cast<std::int64_t>(t->size())};
    if (!s) problems.push_back("missing: " + name + " " + shape_str(want));
    else {
      if (!is_floating(s->type)) problems.push_back("wrong dtype: " + name + " (file: " + to_string(s->type) + ")");
      if (s->shape != want)
        problems.push_back("wrong shape: " + name + " (file: " + shape_str(s->shape) + ", optimizer: " + shape_str(want) + ")");
    }
  }
  for (const auto& [name, s] : f.tensors())
    if (!known.count(name)) problems.push_back("unexpected: " + name + " " + shape_str(s.shape));
  if (!problems.empty()) throw io_error(detail::problem_report(who, path, std::string("the '") + opt.name() + "' optimizer", problems));

  for (auto& [name, t] : state) {
    const auto v = f.find(name)->template to_floating<T>("tensor '" + name + "' of '" + path + "'");
    if (!v.empty()) t->upload(v.data());
  }
  opt.set_steps(steps);
  opt.set_lr(lr);
  return extra;
}

}  // namespace useg::io
