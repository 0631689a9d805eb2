// useg/blocks/cbr_unit.hpp — the memory-planned conv k×k + BatchNorm2d + ReLU unit that the
// blocks are built from (same parameters, names and semantics as conv_bn_relu).
//
// What it keeps between forward and backward (train mode): the convolution's output z (the
// batch norm's input) and the output y = relu(bn(z)). A block may drop y once its consumers have
// run (drop_output) and recompute it from z when the backward needs it again (restore_output,
// bit-identical), so an intermediate activation costs one stored tensor, not two. Gradient
// buffers are transient: z and the batch-norm gradient are released during backward(), and a
// block releases the returned input gradient once it has consumed it (release_grad). Memory
// given back goes to the backend's allocator cache and is reused within the step.
//
// Eval mode: batch norm is folded into the convolution and the ReLU applied as the output is
// stored (one pass, no z) where the backend has those ops; backward() after an eval forward
// recomputes z first.
#pragma once
#include <concepts>
#include <string>
#include <utility>

#include "useg/core/descriptors.hpp"
#include "useg/core/module.hpp"
#include "useg/core/params.hpp"
#include "useg/core/tensor.hpp"
#include "useg/layers/elementwise.hpp"

namespace useg::detail {

/// Optional backend ops (the CPU backend has all of them; a backend without one gets the
/// unfused path).
template <class B>
concept has_bn_relu_ops = requires(context<B>& c, const bn_desc& d, const typename B::scalar* cp, typename B::scalar* p) {
  ops<B>::batch_norm_relu_forward_train(c, d, cp, cp, cp, p, p, p, p, p);
  ops<B>::batch_norm_relu_forward_eval(c, d, cp, cp, cp, cp, cp, p);
  ops<B>::batch_norm_relu_backward(c, d, true, cp, cp, cp, cp, cp, cp, p, p, p);
};
template <class B>
concept has_bn_relu_backward_from_input =
    requires(context<B>& c, const bn_desc& d, const typename B::scalar* cp, typename B::scalar* p) {
      ops<B>::batch_norm_relu_backward_from_input(c, d, cp, cp, cp, cp, cp, cp, p, p, p);
    };
template <class B>
concept has_bn_relu_apply = requires(context<B>& c, const bn_desc& d, const typename B::scalar* cp, typename B::scalar* p) {
  ops<B>::batch_norm_relu_apply(c, d, cp, cp, cp, cp, cp, cp, p);
};
template <class B>
concept has_folded_conv_relu =
    requires(context<B>& c, const conv_desc& d, const typename B::scalar* cp, typename B::scalar* p) {
      ops<B>::conv2d_forward_relu(c, d, cp, cp, cp, p);
      ops<B>::fold_batch_norm(c, 1, std::size_t(1), cp, cp, cp, cp, cp, cp, 1e-5, p, p);
    };

template <class B>
concept has_folded_conv_relu_add =
    has_folded_conv_relu<B> && requires(context<B>& c, const conv_desc& d, const typename B::scalar* cp, typename B::scalar* p) {
      ops<B>::conv2d_forward_relu_add(c, d, cp, cp, cp, cp, p);
    };

template <class B>
concept has_folded_conv_relu_concat =
    has_folded_conv_relu<B> && requires(context<B>& c, const conv_desc& d, const typename B::scalar* cp, typename B::scalar* p) {
      ops<B>::conv2d_forward_concat(c, d, cp, 1, cp, cp, cp, p, true);
    };

template <class B>
concept has_folded_conv_relu_upsampled =
    has_folded_conv_relu<B> && requires(context<B>& c, const conv_desc& d, const typename B::scalar* cp, typename B::scalar* p) {
      { ops<B>::conv_reads_upsampled(d) } -> std::convertible_to<bool>;
      ops<B>::conv2d_forward_upsampled(c, d, cp, cp, cp, p, true);
    };

/// A convolution's parameters, registered as conv2d<B, K, true> registers them.
struct conv_params {
  param_ref w, b;
  int cin = 0, cout = 0, k = 1;
  conv_params() = default;
  template <class B>
  conv_params(param_store<B>& store, const std::string& name, int cin_, int cout_, int k_) : cin(cin_), cout(cout_), k(k_) {
    if (cin <= 0 || cout <= 0)
      throw config_error("useg::conv2d '" + name + "': channel counts must be positive (got " + std::to_string(cin) +
                         " -> " + std::to_string(cout) + ")");
    const int fan_in = cin * k * k;
    w = store.add_parameter(join_name(name, "weight"), shape{cout, cin, k, k}, init_kind::kaiming_uniform, 0, fan_in);
    b = store.add_parameter(join_name(name, "bias"), shape{cout}, init_kind::fan_in_uniform, 0, fan_in);
  }
  double flops(const conv_desc& d) const {
    return 2.0 * d.n * static_cast<double>(d.hw()) * d.cout * d.cin * d.k * d.k;
  }
};
/// A BatchNorm2d's parameters, buffers and counter, registered as batch_norm2d<B> registers them.
struct bn_params {
  param_ref gamma, beta, rmean, rvar, nbt;
  int c = 0;
  bn_params() = default;
  template <class B>
  bn_params(param_store<B>& store, const std::string& name, int c_) : c(c_) {
    if (c <= 0) throw config_error("useg::batch_norm2d '" + name + "': channel count must be positive");
    gamma = store.add_parameter(join_name(name, "weight"), shape{c}, init_kind::constant, 1.0);
    beta = store.add_parameter(join_name(name, "bias"), shape{c}, init_kind::constant, 0.0);
    rmean = store.add_buffer(join_name(name, "running_mean"), shape{c}, 0.0);
    rvar = store.add_buffer(join_name(name, "running_var"), shape{c}, 1.0);
    nbt = store.add_counter(join_name(name, "num_batches_tracked"));
  }
};

template <class B, int K>
class cbr_unit {
  USEG_CHECK_BACKEND(B);

 public:
  using scalar = typename B::scalar;
  static constexpr double eps = 1e-5;
  static constexpr double momentum = 0.1;

  cbr_unit() = default;
  /// Registers conv_name.{weight,bias} then bn_name.{weight,bias,running_mean,running_var,
  /// num_batches_tracked}, with conv2d's and batch_norm2d's shapes and initializations.
  cbr_unit(param_store<B>& store, const std::string& conv_name, const std::string& bn_name, int cin, int cout)
      : store_(&store), cin_(cin), cout_(cout) {
    if (cin <= 0 || cout <= 0)
      throw config_error("useg::conv2d '" + conv_name + "': channel counts must be positive (got " + std::to_string(cin) +
                         " -> " + std::to_string(cout) + ")");
    const int fan_in = cin * K * K;
    w_ = store.add_parameter(join_name(conv_name, "weight"), shape{cout, cin, K, K}, init_kind::kaiming_uniform, 0, fan_in);
    b_ = store.add_parameter(join_name(conv_name, "bias"), shape{cout}, init_kind::fan_in_uniform, 0, fan_in);
    gamma_ = store.add_parameter(join_name(bn_name, "weight"), shape{cout}, init_kind::constant, 1.0);
    beta_ = store.add_parameter(join_name(bn_name, "bias"), shape{cout}, init_kind::constant, 0.0);
    rmean_ = store.add_buffer(join_name(bn_name, "running_mean"), shape{cout}, 0.0);
    rvar_ = store.add_buffer(join_name(bn_name, "running_var"), shape{cout}, 1.0);
    nbt_ = store.add_counter(join_name(bn_name, "num_batches_tracked"));
  }
  /// Shares o's parameters, with its own caches (the recurrent block's repeated application).
  cbr_unit(share_params_t, const cbr_unit& o)
      : store_(o.store_), cin_(o.cin_), cout_(o.cout_), w_(o.w_), b_(o.b_), gamma_(o.gamma_), beta_(o.beta_),
        rmean_(o.rmean_), rvar_(o.rvar_), nbt_(o.nbt_) {}
  cbr_unit(cbr_unit&&) noexcept = default;
  cbr_unit& operator=(cbr_unit&&) noexcept = default;

  /// folded (eval mode): a unit sharing this one's parameters whose eval forward ran earlier in
  /// the same pass (the recurrent block's first application); its folded weights are used rather
  /// than folded again. Ignored in train mode, or when that unit holds no folded weights.
  const tensor<B>& forward(context<B>& ctx, const tensor<B>& x, const cbr_unit* folded = nullptr) {
    require_nchw(x, cin_, "useg::conv_bn_relu::forward");
    x_ = &x;
    train_ = store_->training();
    d_ = conv_desc{x.n(), cin_, cout_, x.h(), x.w(), K};
    bd_ = bn_desc{x.n(), cout_, x.dims().hw(), eps, momentum};
    y_.resize(x.n(), cout_, x.h(), x.w());
    have_y_ = true;
    if (train_) {
      if (x.n() * x.dims().hw() < 2)
        throw shape_error("useg::batch_norm2d::forward: train mode needs more than one value per channel (input " +
                          y_.dims().str() + "); use a larger batch or input, or eval mode");
      conv_z(ctx);
      mean_.resize(shape{cout_});
      invstd_.resize(shape{cout_});
      if constexpr (has_bn_relu_ops<B>) {
        ops<B>::batch_norm_relu_forward_train(ctx, bd_, z_.data(), param(gamma_), param(beta_), store_->buffer(rmean_),
                                              store_->buffer(rvar_), mean_.data(), invstd_.data(), y_.data());
      } else {
        ops<B>::batch_norm_forward_train(ctx, bd_, z_.data(), param(gamma_), param(beta_), store_->buffer(rmean_),
                                         store_->buffer(rvar_), mean_.data(), invstd_.data(), y_.data());
        ops<B>::relu_forward(ctx, y_.data(), y_.data(), y_.size());
      }
      ++store_->counter(nbt_);
      return y_;
    }
    if constexpr (has_folded_conv_relu<B>) {
      const cbr_unit& f = fold(ctx, folded);
      ops<B>::conv2d_forward_relu(ctx, d_, x.data(), f.wf_.data(), f.bf_.data(), y_.data());
      release(z_);
      have_z_ = false;
    } else {
      conv_z(ctx);
      eval_bn_relu(ctx, y_);
    }
    return y_;
  }

  /// Inference (eval mode): forward(concat(a, b)) along channels, the two inputs read in place
  /// where the backend can (conv2d_forward_concat: the same arithmetic, no concatenation built),
  /// else through a concatenation built here. No backward may follow (it throws).
  const tensor<B>& forward_concat(context<B>& ctx, const tensor<B>& a, const tensor<B>& b) {
    if (store_->training()) throw config_error("useg::conv_bn_relu::forward_concat: inference only (eval mode)");
    require_same_spatial(a, b, "useg::conv_bn_relu::forward_concat");
    if (a.n() != b.n() || a.c() + b.c() != cin_)
      throw shape_error("useg::conv_bn_relu::forward_concat: inputs " + a.dims().str() + " and " + b.dims().str() +
                        " do not concatenate to " + std::to_string(cin_) + " channels");
    if constexpr (has_folded_conv_relu_concat<B>) {
      return folded_inference(ctx, a.n(), a.h(), a.w(), [&](const cbr_unit& f) {
        ops<B>::conv2d_forward_concat(ctx, d_, a.data(), a.c(), b.data(), f.wf_.data(), f.bf_.data(), y_.data(), true);
      });
    } else {
      tensor<B> cat(shape::nchw(a.n(), cin_, a.h(), a.w()));
      ops<B>::concat_channels(ctx, a.n(), a.c(), b.c(), a.dims().hw(), a.data(), b.data(), cat.data());
      forward(ctx, cat);
      release(z_);
      have_z_ = false;
      x_ = nullptr;  // gone: backward() throws
      return y_;
    }
  }

  /// Inference (eval mode): whether forward_upsampled(x) reads x through the upsampling (else it
  /// must not be called).
  bool reads_upsampled(const tensor<B>& x) const {
    if constexpr (has_folded_conv_relu_upsampled<B>)
      return !store_->training() && x.rank() == 4 && x.c() == cin_ &&
             ops<B>::conv_reads_upsampled(conv_desc{x.n(), cin_, cout_, 2 * x.h(), 2 * x.w(), K});
    else
      return false;
  }
  /// Inference (eval mode, reads_upsampled(x)): forward(upsample2x(x)) (nearest), the upsampled
  /// input never built (conv2d_forward_upsampled: the same arithmetic). No backward may follow (it
  /// throws).
  const tensor<B>& forward_upsampled(context<B>& ctx, const tensor<B>& x) {
    if (!reads_upsampled(x))
      throw config_error("useg::conv_bn_relu::forward_upsampled: not in eval mode, or the backend cannot read " + x.dims().str() +
                         " through the upsampling");
    if constexpr (has_folded_conv_relu_upsampled<B>) {
      return folded_inference(ctx, x.n(), 2 * x.h(), 2 * x.w(), [&](const cbr_unit& f) {
        ops<B>::conv2d_forward_upsampled(ctx, d_, x.data(), f.wf_.data(), f.bf_.data(), y_.data(), true);
      });
    } else {
      return y_;  // (reads_upsampled() is false: it threw)
    }
  }

  /// out = residual + forward(x) (residual shaped as the output), the output dropped afterwards
  /// (restore_output() recomputes it). Eval mode on a backend with conv2d_forward_relu_add: one
  /// pass, the output never written (the recurrent block's sums, the residual block's output);
  /// otherwise forward, output_plus and drop_output, as before. folded: see forward().
  /// input_read() runs once x has been read for the last time, before out is allocated (the caller
  /// may free x there).
  template <hook InputRead = no_op>
  void forward_plus(context<B>& ctx, const tensor<B>& x, const tensor<B>& residual, tensor<B>& out,
                    const cbr_unit* folded = nullptr, InputRead&& input_read = {}) {
    if constexpr (has_folded_conv_relu_add<B>) {
      if (!store_->training()) {
        require_nchw(x, cin_, "useg::conv_bn_relu::forward");
        if (residual.dims() != shape::nchw(x.n(), cout_, x.h(), x.w()))
          throw shape_error("useg::conv_bn_relu::forward_plus: residual " + residual.dims().str() + " does not match the output " +
                            shape::nchw(x.n(), cout_, x.h(), x.w()).str());
        x_ = &x;
        train_ = false;
        d_ = conv_desc{x.n(), cin_, cout_, x.h(), x.w(), K};
        bd_ = bn_desc{x.n(), cout_, x.dims().hw(), eps, momentum};
        const cbr_unit& f = fold(ctx, folded);
        out.resize(residual.dims());
        ops<B>::conv2d_forward_relu_add(ctx, d_, x.data(), f.wf_.data(), f.bf_.data(), residual.data(), out.data());
        release(y_);
        have_y_ = false;
        release(z_);
        have_z_ = false;
        input_read();
        return;
      }
    }
    forward(ctx, x, folded);
    input_read();
    output_plus(ctx, residual, out);
    drop_output();
  }

  /// Accumulates the parameter gradients; returns dL/dx unless need_gx is false. Needs the
  /// forward's input alive and this unit's output present (restore_output after a drop).
  /// Hooks where the caller may free what it no longer needs, before this backward allocates
  /// more: after_bn() once the batch norm's backward has consumed gy and the output (e.g.
  /// drop_output()), after_weights() once the weight gradient has read the input (before the
  /// input gradient is allocated).
  template <hook AfterBn = no_op, hook AfterWeights = no_op>
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy, bool need_gx = true, AfterBn&& after_bn = {},
                            AfterWeights&& after_weights = {}) {
    if (!x_) throw shape_error("useg::conv_bn_relu::backward: called before forward");
    if (!have_z_) conv_z(ctx);  // the eval forward took the folded path
    // A dropped output is restored for the ReLU's mask, unless the backend recomputes the mask
    // from z (train mode).
    bool mask_from_z = false;
    if constexpr (has_bn_relu_backward_from_input<B>) mask_from_z = train_ && !have_y_;
    if (!have_y_ && !mask_from_z) restore_output(ctx);
    if (!train_) {
      mean_.resize(shape{cout_});
      invstd_.resize(shape{cout_});
      ops<B>::copy(mean_.data(), store_->buffer(rmean_), static_cast<std::size_t>(cout_));
      ops<B>::batch_norm_eval_invstd(ctx, cout_, eps, store_->buffer(rvar_), invstd_.data());
    }
    // The gradient of z is written over z (each element read, then written; both backends allow
    // gx to alias x), which the backward needs for nothing else: one tensor less at the peak.
    gz_ = std::move(z_);
    have_z_ = false;
    if (mask_from_z) {
      if constexpr (has_bn_relu_backward_from_input<B>)
        ops<B>::batch_norm_relu_backward_from_input(ctx, bd_, gz_.data(), gy.data(), param(gamma_), param(beta_),
                                                    mean_.data(), invstd_.data(), gz_.data(), grad(gamma_), grad(beta_));
    } else if constexpr (has_bn_relu_ops<B>) {
      ops<B>::batch_norm_relu_backward(ctx, bd_, train_, gz_.data(), y_.data(), gy.data(), param(gamma_), mean_.data(),
                                       invstd_.data(), gz_.data(), grad(gamma_), grad(beta_));
    } else {
      tensor<B> gr(gz_.dims());
      ops<B>::relu_backward(ctx, y_.data(), gy.data(), gr.data(), gr.size());
      ops<B>::batch_norm_backward(ctx, bd_, train_, gz_.data(), gr.data(), param(gamma_), mean_.data(), invstd_.data(),
                                  gz_.data(), grad(gamma_), grad(beta_));
    }
    after_bn();
    ops<B>::conv2d_backward_weights(ctx, d_, x_->data(), gz_.data(), grad(w_), grad(b_));
    after_weights();  // may free the input
    if (need_gx) {
      gx_.resize(shape::nchw(d_.n, cin_, d_.h, d_.w));
      ops<B>::conv2d_backward_data(ctx, d_, param(w_), gz_.data(), gx_.data());
    }
    // z (now its gradient) served this backward only: free it now rather than at the next
    // forward, so that it does not add to the peak of the backward pass. (The output stays unless
    // after_bn dropped it: a consumer may still read it.) A second backward recomputes z from the
    // input, bit-identical.
    release(gz_);
    return gx_;
  }

  const tensor<B>& output() const { return y_; }
  /// The last forward's output shape (also while the output is dropped).
  shape output_dims() const { return shape::nchw(d_.n, cout_, d_.h, d_.w); }
  /// Whether the output is present (not dropped) / the convolution output z is kept.
  bool has_output() const { return have_y_; }
  bool has_conv_output() const { return have_z_; }
  /// Free the output once its consumers have run; restore_output() recomputes it (train mode:
  /// bit-identical, from z and the saved statistics; eval mode: convolution and batch norm
  /// again). Kept in train mode on a backend without batch_norm_relu_apply.
  void drop_output() {
    if (train_) {
      if constexpr (!has_bn_relu_apply<B>) return;
      if (!have_z_ && (!x_ || x_->empty())) return;  // could not be recomputed
    }
    release(y_);
    have_y_ = false;
  }
  /// Recompute the output dropped by drop_output().
  void restore_output(context<B>& ctx) {
    if (have_y_) return;
    if (!have_z_) conv_z(ctx);  // freed by a backward, or the eval forward took the folded path
    y_.resize(shape::nchw(d_.n, cout_, d_.h, d_.w));
    if (train_) {
      if constexpr (has_bn_relu_apply<B>)
        ops<B>::batch_norm_relu_apply(ctx, bd_, z_.data(), param(gamma_), param(beta_), mean_.data(), invstd_.data(),
                                      nullptr, y_.data());
    } else {
      eval_bn_relu(ctx, y_);
    }
    have_y_ = true;
  }
  /// out = residual + output, recomputed from z without materializing the output when it was
  /// dropped in train mode (the recurrent block's x + x1).
  void output_plus(context<B>& ctx, const tensor<B>& residual, tensor<B>& out) {
    out.resize(shape::nchw(d_.n, cout_, d_.h, d_.w));
    if constexpr (has_bn_relu_apply<B>) {
      if (!have_y_ && train_) {
        if (!have_z_) conv_z(ctx);
        ops<B>::batch_norm_relu_apply(ctx, bd_, z_.data(), param(gamma_), param(beta_), mean_.data(), invstd_.data(),
                                      residual.data(), out.data());
        return;
      }
    }
    restore_output(ctx);
    ops<B>::add(ctx, residual.data(), y_.data(), out.data(), out.size());
  }
  /// Free everything kept for a backward (convolution output, folded weights, gradients); the
  /// output stays. For inference (the model's predict()): no backward follows.
  void release_state() {
    release(z_);
    have_z_ = false;
    release(gz_);
    release(gx_);
    release(wf_);
    release(bf_);
  }
  /// Free the output as well.
  void release_all() {
    release_state();
    release(y_);
    have_y_ = false;
  }
  /// Free the input gradient returned by the last backward (its consumer has run).
  void release_grad() { release(gx_); }

  /// Whether the last forward ran in train mode.
  bool training() const { return train_; }
  int in_channels() const { return cin_; }
  int out_channels() const { return cout_; }
  /// conv (2 per multiply-add) + batch norm (4 per value) + ReLU (1 per value).
  double flops() const {
    const double pix = static_cast<double>(d_.n) * static_cast<double>(d_.hw());
    return 2.0 * pix * d_.cout * d_.cin * K * K + 5.0 * pix * d_.cout;
  }

 private:
  scalar* param(param_ref r) { return store_->param(r); }
  scalar* grad(param_ref r) { return store_->grad(r); }
  static void release(tensor<B>& t) { t = tensor<B>(); }
  /// Inference through the folded weights for an input the unit does not keep (two inputs read in
  /// place, an input read through its upsampling): the output of n images at h × w, written by
  /// conv(f) with f the folded unit (d_ set for the call); no z, and no input for a backward.
  template <class Conv>
  const tensor<B>& folded_inference(context<B>& ctx, int n, int h, int w, Conv&& conv) {
    train_ = false;
    d_ = conv_desc{n, cin_, cout_, h, w, K};
    bd_ = bn_desc{n, cout_, static_cast<std::size_t>(h) * w, eps, momentum};
    y_.resize(n, cout_, h, w);
    have_y_ = true;
    conv(fold(ctx, nullptr));
    release(z_);
    have_z_ = false;
    x_ = nullptr;  // never built: backward() throws
    return y_;
  }
  /// Eval mode: the unit whose folded weights (batch norm folded into the convolution) this
  /// forward uses: `folded` when it holds them (see forward()), else this one, folded now.
  const cbr_unit& fold(context<B>& ctx, const cbr_unit* folded) {
    if (folded && (folded->store_ != store_ || folded->w_.index != w_.index || folded->gamma_.index != gamma_.index))
      throw config_error("useg::conv_bn_relu::forward: the folded weights given belong to other parameters");
    if (folded && folded != this && !folded->train_ && !folded->wf_.empty()) {
      release(wf_);
      release(bf_);
      return *folded;
    }
    wf_.resize(shape{cout_, cin_, K, K});
    bf_.resize(shape{cout_});
    ops<B>::fold_batch_norm(ctx, cout_, static_cast<std::size_t>(cin_) * K * K, param(w_), param(b_), param(gamma_),
                            param(beta_), store_->buffer(rmean_), store_->buffer(rvar_), eps, wf_.data(), bf_.data());
    return *this;
  }
  void conv_z(context<B>& ctx) {
    z_.resize(shape::nchw(d_.n, cout_, d_.h, d_.w));
    ops<B>::conv2d_forward(ctx, d_, x_->data(), param(w_), param(b_), z_.data());
    have_z_ = true;
  }
  void eval_bn_relu(context<B>& ctx, tensor<B>& y) {
    if constexpr (has_bn_relu_ops<B>) {
      ops<B>::batch_norm_relu_forward_eval(ctx, bd_, z_.data(), param(gamma_), param(beta_), store_->buffer(rmean_),
                                           store_->buffer(rvar_), y.data());
    } else {
      ops<B>::batch_norm_forward_eval(ctx, bd_, z_.data(), param(gamma_), param(beta_), store_->buffer(rmean_),
                                      store_->buffer(rvar_), y.data());
      ops<B>::relu_forward(ctx, y.data(), y.data(), y.size());
    }
  }

  param_store<B>* store_ = nullptr;
  int cin_ = 0, cout_ = 0;
  param_ref w_, b_, gamma_, beta_, rmean_, rvar_, nbt_;
  conv_desc d_{};
  bn_desc bd_{};
  bool train_ = true, have_z_ = false, have_y_ = false;
  const tensor<B>* x_ = nullptr;
  tensor<B> z_, y_, gz_, gx_, mean_, invstd_, wf_, bf_;
};

}  // namespace useg::detail
