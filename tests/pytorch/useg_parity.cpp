// useg_parity — the useg side of the PyTorch parity test (tests/pytorch/parity.py).
//
//   useg_parity WEIGHTS INPUTS RESULTS CHECKPOINT
//
// WEIGHTS: a state_dict written by PyTorch (safetensors), loaded with useg::io::load_weights.
// INPUTS:  "x" (n, 3, h, w) and "target" (loss bce) or "R" (loss dot: L = sum(out * R)), with
//          metadata model, width, depth, t, up, loss, steps, lr, weight_decay, and precision
//          (f32: useg::cpu, f64: useg::cpu_f64).
// RESULTS: eval_out (eval-mode forward of the loaded weights); then, in train mode, for each step
//          k = 1..steps: out_k, loss_k, buffer_k.<name> and counter_k.<name> (after the forward),
//          grad_k.<name> (after the backward), grad_x_1, and param_k.<name> after the Adam step;
//          finally exp_avg and exp_avg_sq.
// CHECKPOINT: useg::io::save_weights after the last step (PyTorch loads it with strict=True).
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "useg/io/checkpoint.hpp"
#include "useg/useg.hpp"

using namespace useg;

namespace {

template <class B>
std::vector<std::int64_t> shape_of(const tensor<B>& t) {
  std::vector<std::int64_t> s;
  for (int i = 0; i < t.rank(); ++i) s.push_back(t.dims()[i]);
  return s;
}
template <class B>
tensor<B> to_tensor(const io::stored_tensor& s, const char* name) {
  if (s.shape.size() != 4) throw error(std::string("useg_parity: input '") + name + "' must be rank 4");
  const shape sh{static_cast<int>(s.shape[0]), static_cast<int>(s.shape[1]), static_cast<int>(s.shape[2]), static_cast<int>(s.shape[3])};
  return tensor<B>::from_host(sh, s.to_floating<typename B::scalar>(name));
}
template <class B>
void add_tensor(io::safetensors& out, const std::string& name, const tensor<B>& t) { out.add(name, shape_of(t), t.to_host()); }

/// Each entry of the kind `kind` from the flat host copy `flat`, under prefix + name.
template <class B, class T>
void add_entries(io::safetensors& out, const std::string& prefix, const param_store<B>& s, entry_kind kind,
                 const std::vector<T>& flat) {
  for (const auto& e : s.entries()) {
    if (e.kind != kind) continue;
    std::vector<std::int64_t> sh;
    for (int i = 0; i < e.dims.rank; ++i) sh.push_back(e.dims[i]);
    out.add(prefix + e.name, io::stored_tensor::from_values<T>(sh, flat.data() + e.offset, e.size()));
  }
}

template <class Model>
void run(const unet_config& cfg, const io::safetensors& in, const std::string& weights, const std::string& results,
         const std::string& checkpoint) {
  const auto& md = in.metadata;
  const std::string loss = md.at("loss");
  const int steps = std::stoi(md.at("steps"));
  adam_options ao;
  ao.lr = std::stod(md.at("lr"));
  ao.weight_decay = std::stod(md.at("weight_decay"));

  using B = typename Model::backend;
  Model net(cfg);
  io::load_weights(weights, net.params());
  auto& store = net.params();
  context<B>& ctx = net.ctx();
  const tensor<B> x = to_tensor<B>(in.at("x"), "x");
  const tensor<B> target = to_tensor<B>(in.at(loss == "bce" ? "target" : "R"), "target");

  io::safetensors out;
  net.eval();
  add_tensor(out, "eval_out", net.forward(x));

  net.train();
  adam<B> opt(store, ctx, ao);
  tensor<B> g;
  for (int k = 1; k <= steps; ++k) {
    const std::string K = std::to_string(k);
    net.zero_grad();
    const tensor<B>& y = net.forward(x);
    add_tensor(out, "out_" + K, y);
    add_entries(out, "buffer_" + K + ".", store, entry_kind::buffer, store.flat_buffers().to_host());
    for (const auto& e : store.entries())
      if (e.kind == entry_kind::counter) out.add("counter_" + K + "." + e.name, std::vector<std::int64_t>{}, std::vector<std::int64_t>{store.counters()[e.offset]});
    double L = 0;
    if (loss == "bce") {
      L = bce_with_logits_loss(ctx, y, target, &g);
    } else {  // dot: L = sum(out * R), dL/dout = R
      const auto yh = y.to_host(), rh = target.to_host();
      for (std::size_t i = 0; i < yh.size(); ++i) L += static_cast<double>(yh[i]) * rh[i];
      g.copy_from(target);
    }
    out.add("loss_" + K, {1}, std::vector<double>{L});
    const tensor<B>& gx = net.backward(g, k == 1);
    if (k == 1) add_tensor(out, "grad_x_1", gx);
    add_entries(out, "grad_" + K + ".", store, entry_kind::parameter, store.flat_grads().to_host());
    opt.step();
    add_entries(out, "param_" + K + ".", store, entry_kind::parameter, store.flat_params().to_host());
  }
  for (auto& [name, t] : opt.state()) out.add(name, {static_cast<std::int64_t>(t->size())}, t->to_host());
  io::write_safetensors(results, out);
  io::save_weights(checkpoint, store, {{"written_by", "useg_parity"}, {"model", Model::name()}});
}

template <class B>
void dispatch(const std::string& model, const unet_config& cfg, const io::safetensors& in, char** argv) {
  if (model == "unet") run<unet<B, 3, 1>>(cfg, in, argv[1], argv[3], argv[4]);
  else if (model == "attention-unet") run<attention_unet<B, 3, 1>>(cfg, in, argv[1], argv[3], argv[4]);
  else if (model == "r2unet") run<r2unet<B, 3, 1>>(cfg, in, argv[1], argv[3], argv[4]);
  else if (model == "ar2unet") run<ar2unet<B, 3, 1>>(cfg, in, argv[1], argv[3], argv[4]);
  else throw error("useg_parity: unknown model '" + model + "'");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s WEIGHTS INPUTS RESULTS CHECKPOINT\n", argv[0]);
    return 2;
  }
  try {
    const io::safetensors in = io::read_safetensors(argv[2]);
    const auto& md = in.metadata;
    unet_config cfg;
    cfg.width = std::stoi(md.at("width"));
    cfg.depth = std::stoi(md.at("depth"));
    cfg.t = std::stoi(md.at("t"));
    cfg.up = md.at("up") == "transpose" ? up_kind::transpose : up_kind::upsample;
    const std::string model = md.at("model");
    const auto p = md.find("precision");
    const bool f64 = p != md.end() && p->second == "f64";
    if (f64) dispatch<cpu_f64>(model, cfg, in, argv);
    else dispatch<cpu>(model, cfg, in, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "useg_parity: %s\n", e.what());
    return 1;
  }
  return 0;
}
