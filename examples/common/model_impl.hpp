// examples/common/model_impl.hpp — the adapter from a model template to any_model<B>; included
// only by the models_*.cpp (useg::cpu) and models_*_cuda.cu (useg::cuda) translation units.
#pragma once
#include <memory>

#include "model_registry.hpp"

namespace lgg {

template <class M>
class model_adapter final : public any_model<typename M::backend> {
  using B = typename M::backend;

 public:
  explicit model_adapter(const model_spec& s) : any_model<B>(s), net_(s.cfg) {}
  const useg::tensor<B>& forward(useg::context<B>& ctx, const useg::tensor<B>& x) override { return net_.forward(ctx, x); }
  const useg::tensor<B>& predict(useg::context<B>& ctx, const useg::tensor<B>& x) override { return net_.predict(ctx, x); }
  void backward(useg::context<B>& ctx, const useg::tensor<B>& g) override { net_.backward(ctx, g, false); }
  void train(bool on) override { net_.train(on); }
  useg::param_store<B>& params() override { return net_.params(); }
  std::string summary() const override { return net_.summary(); }
  std::size_t num_parameters() const override { return net_.num_parameters(); }
  double forward_flops() const override { return net_.forward_flops(); }
  const char* reference_name() const override { return M::reference_name(); }

 private:
  M net_;
};

/// Instantiate Model<B, In, 1> for In = 1 and 3.
template <template <class, int, int> class Model, class B>
std::unique_ptr<any_model<B>> make_family(const model_spec& s) {
  if (s.classes != 1) return nullptr;
  if (s.in_channels == 1) return std::make_unique<model_adapter<Model<B, 1, 1>>>(s);
  if (s.in_channels == 3) return std::make_unique<model_adapter<Model<B, 3, 1>>>(s);
  return nullptr;
}

}  // namespace lgg

/// Define make_<family>_family<B> (one model family on one backend) in its translation unit.
#define LGG_DEFINE_FAMILY(fn, Model, B)                                                         \
  namespace lgg {                                                                               \
  template <>                                                                                   \
  std::unique_ptr<any_model<B>> fn<B>(const model_spec& s) { return make_family<Model, B>(s); } \
  }
