// useg/models/unet_skeleton.hpp — one U-Net skeleton; the four public models are aliases of it.
//
//   encoder: Enc1 .. Enc{depth+1}, widths width·2^i, 2×2 max pooling between levels
//   decoder: for level i = depth .. 1:  u = Up{i+1}(d);  s = Gate{i+1}(g = u, x = skip_i);
//            d = Dec{i+1}(cat(s, u))
//   head:    Conv_1x1 (width -> Classes), logits out
// Inputs whose height/width are not multiples of 2^depth are zero-padded (centered) inside and
// the logits are cropped back, so any size >= 1 works.
//
// Training memory: between forward and backward the model keeps the blocks' convolution outputs
// (with the pooled tensors and the attention gates' state); each block's output is dropped once
// its forward consumers have run and restored (bit-identically, one batch-norm pass from the kept
// convolution output) where the backward reads it, then dropped again. The forward's input must
// stay alive until the backward has run; a second backward after one forward runs the forward
// again.
#pragma once
#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "useg/blocks/attention_gate.hpp"
#include "useg/blocks/conv_block.hpp"
#include "useg/blocks/rrcnn_block.hpp"
#include "useg/blocks/up_conv.hpp"
#include "useg/core/params.hpp"
#include "useg/layers/conv2d.hpp"
#include "useg/layers/elementwise.hpp"
#include "useg/layers/resample.hpp"

namespace useg {

/// Run-time configuration of a U-Net family model.
struct unet_config {
  int width = 64;                  ///< base width: level i has width·2^i channels
  int depth = 4;                   ///< number of poolings (levels - 1)
  int t = 2;                       ///< recurrence of the R2 blocks (ignored by conv blocks)
  up_kind up = up_kind::upsample;  ///< decoder up-convolution kind
  std::uint64_t seed = 0;          ///< parameter initialization seed
};

/// Encoder-block policy: U-Net's double conv (names Conv{i}, Up_conv{i}).
struct conv_encoder {
  template <class B>
  using block = conv_block<B>;
  static constexpr const char* encoder_prefix = "Conv";
  static constexpr const char* decoder_prefix = "Up_conv";
  static constexpr bool recurrent = false;
};
/// Encoder-block policy: R2U-Net's recurrent residual block (names RRCNN{i}, Up_RRCNN{i}).
struct rrcnn_encoder {
  template <class B>
  using block = rrcnn_block<B>;
  static constexpr const char* encoder_prefix = "RRCNN";
  static constexpr const char* decoder_prefix = "Up_RRCNN";
  static constexpr bool recurrent = true;
};
/// Skip-gate policy: skips go straight to the concatenation.
struct identity_skip {
  static constexpr bool attention = false;
};
/// Skip-gate policy: additive attention gates (names Att{i}).
struct attention_skip {
  static constexpr bool attention = true;
};

namespace detail {
template <class E>
inline constexpr bool is_encoder_policy = std::is_same_v<E, conv_encoder> || std::is_same_v<E, rrcnn_encoder>;
template <class G>
inline constexpr bool is_gate_policy = std::is_same_v<G, identity_skip> || std::is_same_v<G, attention_skip>;
/// Backend contexts with a packed-weights cache for inference (begin/end_weight_cache).
template <class B>
concept has_weight_cache = requires(context<B>& c) {
  c.begin_weight_cache();
  c.end_weight_cache();
};
}  // namespace detail

/// B: backend tag (useg::cpu, useg::cuda, ...). InChannels: input image channels. Classes: output
/// channels (logits). Encoder: conv_encoder | rrcnn_encoder. Gate: identity_skip | attention_skip.
template <class B, int InChannels, int Classes, class Encoder, class Gate>
class unet_skeleton {
  USEG_CHECK_BACKEND(B);
  static_assert(InChannels >= 1, "useg model: InChannels (input channels) must be at least 1");
  static_assert(Classes >= 1, "useg model: Classes (output channels) must be at least 1");
  static_assert(detail::is_encoder_policy<Encoder>, "useg model: Encoder must be useg::conv_encoder or useg::rrcnn_encoder");
  static_assert(detail::is_gate_policy<Gate>, "useg model: Gate must be useg::identity_skip or useg::attention_skip");

 public:
  using backend = B;
  using scalar = typename B::scalar;
  using block_t = typename Encoder::template block<B>;
  static constexpr int in_channels = InChannels;
  static constexpr int classes = Classes;
  static constexpr bool has_attention = Gate::attention;
  static constexpr bool is_recurrent = Encoder::recurrent;

  explicit unet_skeleton(unet_config cfg = {}) : cfg_(cfg), store_(std::make_unique<param_store<B>>()) {
    validate(cfg);
    own_ctx_ = std::make_unique<context<B>>();
    ctx_ = own_ctx_.get();
    build();
  }
  unet_skeleton(unet_skeleton&&) noexcept = default;
  unet_skeleton& operator=(unet_skeleton&&) noexcept = default;

  /// The model's name as the PyTorch reference class would have it.
  static const char* reference_name() {
    if constexpr (Encoder::recurrent) return Gate::attention ? "R2AttU_Net" : "R2U_Net";
    else return Gate::attention ? "AttU_Net" : "U_Net";
  }
  /// Short name: unet, attention-unet, r2unet, ar2unet.
  static const char* name() {
    if constexpr (Encoder::recurrent) return Gate::attention ? "ar2unet" : "r2unet";
    else return Gate::attention ? "attention-unet" : "unet";
  }

  // ------------------------------------------------------------------ running
  /// Logits (n, Classes, h, w) for x (n, InChannels, h, w), with the model's own context.
  const tensor<B>& forward(const tensor<B>& x) { return forward(*ctx_, x); }
  const tensor<B>& forward(context<B>& ctx, const tensor<B>& x) { return run(ctx, x, true); }

  /// Inference: logits in eval mode (whatever the current mode, which is restored), keeping
  /// nothing for a backward — each activation is freed as soon as its last consumer has run,
  /// as under PyTorch's torch.no_grad(). backward() after predict() throws.
  const tensor<B>& predict(const tensor<B>& x) { return predict(*ctx_, x); }
  const tensor<B>& predict(context<B>& ctx, const tensor<B>& x) {
    const bool was_training = is_training();
    eval();
    // The backend may keep packed weights from one prediction to the next (the CPU context's
    // packed-weights cache); the session ends with the call, even by an exception.
    struct weight_cache_session {
      context<B>& c;
      explicit weight_cache_session(context<B>& c_) : c(c_) {
        if constexpr (detail::has_weight_cache<B>) c.begin_weight_cache();
      }
      ~weight_cache_session() {
        if constexpr (detail::has_weight_cache<B>) c.end_weight_cache();
      }
    } session(ctx);
    try {
      const tensor<B>& y = run(ctx, x, false);
      train(was_training);
      return y;
    } catch (...) {
      train(was_training);
      throw;
    }
  }

 private:
  const tensor<B>& run(context<B>& ctx, const tensor<B>& x, bool keep) {
    require_nchw(x, InChannels, (std::string(name()) + "::forward").c_str());
    have_state_ = false;
    backward_ran_ = false;
    in_ = &x;
    // A train-mode forward for a backward drops each block's output once its consumers have run;
    // the backward restores it (bit-identically, from the block's kept convolution output) where
    // it reads it and drops it again after.
    drop_ = keep && is_training();
    const int m = 1 << cfg_.depth;
    in_dims_ = x.dims();
    const int H = (x.h() + m - 1) / m * m, W = (x.w() + m - 1) / m * m;
    padded_ = H != x.h() || W != x.w();
    top_ = (H - x.h()) / 2;
    left_ = (W - x.w()) / 2;
    const tensor<B>* in = &x;
    if (padded_) {
      xpad_.resize(x.n(), InChannels, H, W);
      ops<B>::pad2d(ctx, static_cast<std::size_t>(x.n()) * InChannels, x.h(), x.w(), H, W, top_, left_, x.data(), xpad_.data());
      in = &xpad_;
    }
    // keep = false (predict): every activation is released once its last consumer has run.
    const std::size_t D = static_cast<std::size_t>(cfg_.depth);
    const tensor<B>* e = &enc_[0].forward(ctx, *in);
    if (!keep) enc_[0].release_state();
    skips_[0] = e;
    for (std::size_t i = 1; i <= D; ++i) {
      const tensor<B>& p = pool_[i - 1].forward(ctx, *e);
      e = &enc_[i].forward(ctx, p);
      if (!keep) {
        pool_[i - 1].release_output();
        enc_[i].release_state();
      }
      skips_[i] = e;
    }
    const tensor<B>* d = e;
    for (std::size_t i = D; i >= 1; --i) {
      // Predicting: the up-convolution may read its input through the upsampling.
      const tensor<B>& u = keep ? up_[i - 1].forward(ctx, *d) : up_[i - 1].forward_inference(ctx, *d);
      if (!keep) {
        up_[i - 1].release_state();
        if (i == D) enc_[D].release_all();
        else dec_[i].release_all();
      }
      if (drop_) up_input(i).drop_output();
      const tensor<B>* s = skips_[i - 1];
      if constexpr (Gate::attention) {
        s = &att_[i - 1].forward(ctx, u, *s);
        if (!keep) att_[i - 1].release_state();
      }
      // Predicting: the skip, the gated skip and the up-convolution's output have no reader left
      // once the decoder has read them; freed before the decoder block allocates.
      auto release_level_inputs = [&] {
        up_[i - 1].release_all();
        enc_[i - 1].release_all();
        if constexpr (Gate::attention) att_[i - 1].release_all();
      };
      if (!keep) {
        // The decoder block's first convolution (the recurrent residual block's 1×1, the double
        // convolution's first 3×3) reads the skip and the up-convolution's output in place.
        d = &dec_[i - 1].forward_concat(ctx, *s, u, release_level_inputs);
        dec_[i - 1].release_state();
        continue;
      }
      const tensor<B>& c = cat_[i - 1].forward(ctx, *s, u);
      if (!keep) release_level_inputs();  // copied into the concatenation
      // The concatenation (and the gated skip) are freed once the block's first convolution has
      // read them, and recomputed for the backward.
      d = &dec_[i - 1].forward(ctx, c, [&] {
        cat_[i - 1].release_output();
        if constexpr (Gate::attention) att_[i - 1].drop_output();
        if (drop_) drop_level_outputs(i - 1);
      });
      if (!keep) dec_[i - 1].release_state();
    }
    const tensor<B>& logits = head_.forward(ctx, *d);
    if (!keep) dec_[0].release_all();
    have_state_ = keep;
    if (!padded_) return logits;
    out_.resize(x.n(), Classes, x.h(), x.w());
    ops<B>::crop2d(ctx, static_cast<std::size_t>(x.n()) * Classes, H, W, x.h(), x.w(), top_, left_, logits.data(), out_.data());
    if (!keep) head_.release_output();
    return out_;
  }

 public:

  /// Backpropagate dL/dlogits (same shape as the last forward's output). Parameter gradients are
  /// ADDED to grads() (call zero_grad() between steps). Returns dL/dx when need_input_grad,
  /// otherwise an empty tensor.
  const tensor<B>& backward(const tensor<B>& grad_logits, bool need_input_grad = false) {
    return backward(*ctx_, grad_logits, need_input_grad);
  }
  const tensor<B>& backward(context<B>& ctx, const tensor<B>& gy, bool need_input_grad = false) {
    if (!have_state_)
      throw config_error(std::string(name()) + "::backward: no forward state (call forward(), not predict(), before backward())");
    const shape expect = shape::nchw(in_dims_.n(), Classes, in_dims_.h(), in_dims_.w());
    if (gy.dims() != expect)
      throw shape_error(std::string(name()) + "::backward: gradient shape " + gy.dims().str() + " does not match the output " +
                        expect.str() + " of the last forward");
    // A second backward after one forward: the first freed what it read, so the forward is run
    // again (bit-identical; the batch norms' running statistics and counters are put back).
    if (backward_ran_ && drop_) replay(ctx);
    backward_ran_ = true;
    const tensor<B>* g = &gy;
    if (padded_) {
      const tensor<B>& logits = head_.output();
      gpad_.resize(logits.dims());
      ops<B>::pad2d(ctx, static_cast<std::size_t>(gy.n()) * Classes, gy.h(), gy.w(), logits.h(), logits.w(), top_, left_,
                    gy.data(), gpad_.data());
      g = &gpad_;
    }
    // Every gradient is released as soon as its consumer has run, so the memory of the step's
    // transient tensors is reused (the backend's allocator cache) and the peak stays low.
    g = &head_.backward(ctx, *g);
    gpad_ = tensor<B>();
    if (drop_) dec_[0].drop_output();
    const std::size_t D = static_cast<std::size_t>(cfg_.depth);
    for (std::size_t i = 1; i <= D; ++i) {
      // The decoder block's input, cat(skip or gated skip, up-conv output), is rebuilt one half
      // at a time, each freed once copied: the skip is read again by the gate's
      // and the max-pool's backward, the up-convolution's output by the gate's (both restored
      // there).
      if (drop_) enc_[i - 1].restore_output(ctx);
      const tensor<B>* s = skips_[i - 1];
      if constexpr (Gate::attention) s = &att_[i - 1].restore_output(ctx);
      cat_[i - 1].begin(s->dims(), up_[i - 1].output_dims());
      cat_[i - 1].fill_a(ctx, *s);
      if constexpr (Gate::attention) att_[i - 1].drop_output();
      if (drop_) {
        enc_[i - 1].drop_output();
        up_[i - 1].restore_output(ctx);
      }
      cat_[i - 1].fill_b(ctx, up_[i - 1].output());
      if (drop_) up_[i - 1].drop_output();
      // The incoming gradient (the head's or the up-convolution's input gradient) is freed as soon
      // as the block's last batch norm has consumed it, the concatenation once the block's first
      // weight gradient has read it.
      const tensor<B>& gd = dec_[i - 1].backward(
          ctx, *g, true,
          [&] {
            if (i == 1) head_.release_grad();
            else up_[i - 2].release_grad();
          },
          [&] { cat_[i - 1].release_output(); });
      auto [gs, gu] = cat_[i - 1].backward(ctx, gd);
      dec_[i - 1].release_grad();
      const tensor<B>* gu_total = &gu;
      skip_grads_[i - 1] = &gs;
      if constexpr (Gate::attention) {
        if (drop_) {  // the gate's inputs
          enc_[i - 1].restore_output(ctx);
          up_[i - 1].restore_output(ctx);
        }
        auto [gg, gx] = att_[i - 1].backward(ctx, gs);
        if (drop_) drop_level_outputs(i - 1);
        skip_grads_[i - 1] = &gx;
        gsum_[i - 1].resize(gu.dims());
        ops<B>::add(ctx, gu.data(), gg.data(), gsum_[i - 1].data(), gu.size());
        att_[i - 1].release_gate_grad();
        cat_[i - 1].release_grads();
        gu_total = &gsum_[i - 1];
      }
      if (drop_) up_input(i).restore_output(ctx);
      g = &up_[i - 1].backward(ctx, *gu_total, [&] {
        if constexpr (Gate::attention) gsum_[i - 1] = tensor<B>();
        else cat_[i - 1].release_grad_b();
      });
      if (drop_) up_input(i).drop_output();
    }
    // g is now dL/d(bottom encoder output).
    for (std::size_t j = D; j >= 1; --j) {
      const tensor<B>& ge = enc_[j].backward(ctx, *g, true, [&] {
        if (j == D) up_[D - 1].release_grad();
        else esum_[j] = tensor<B>();
      });
      if (drop_) enc_[j - 1].restore_output(ctx);  // the max-pool's input
      const tensor<B>& gp = pool_[j - 1].backward(ctx, ge);
      if (drop_) enc_[j - 1].drop_output();
      enc_[j].release_grad();
      esum_[j - 1].resize(gp.dims());
      ops<B>::add(ctx, gp.data(), skip_grads_[j - 1]->data(), esum_[j - 1].data(), gp.size());
      pool_[j - 1].release_grad();
      if constexpr (Gate::attention) att_[j - 1].release_grads();
      else cat_[j - 1].release_grads();
      g = &esum_[j - 1];
    }
    const tensor<B>& gin = enc_[0].backward(ctx, *g, need_input_grad, [&] { esum_[0] = tensor<B>(); });
    if (!need_input_grad) {
      gx_.resize(shape{});
      return gx_;
    }
    if (!padded_) return gin;
    gx_.resize(in_dims_);
    ops<B>::crop2d(ctx, static_cast<std::size_t>(in_dims_.n()) * InChannels, gin.h(), gin.w(), in_dims_.h(), in_dims_.w(),
                   top_, left_, gin.data(), gx_.data());
    return gx_;
  }

  // ------------------------------------------------------------------ state
  void train(bool on = true) { store_->set_training(on); }
  void eval() { store_->set_training(false); }
  bool is_training() const { return store_->training(); }
  void zero_grad() { store_->zero_grad(); }
  param_store<B>& params() { return *store_; }
  const param_store<B>& params() const { return *store_; }
  std::size_t num_parameters() const { return store_->num_parameters(); }
  const unet_config& config() const { return cfg_; }
  /// Channels at each level: width·2^i, i = 0..depth.
  std::vector<int> widths() const {
    std::vector<int> w;
    for (int i = 0; i <= cfg_.depth; ++i) w.push_back(cfg_.width << i);
    return w;
  }
  context<B>& ctx() { return *ctx_; }
  /// Run the model-level forward()/backward() overloads without a context on `ctx` (not owned).
  void set_context(context<B>& ctx) { ctx_ = &ctx; }

  /// Visit each learnable parameter: f(const param_entry&, scalar* value, scalar* grad), in
  /// state_dict order. Names are stable and equal to the PyTorch reference's keys.
  template <class F>
  void visit_parameters(F&& f) {
    for (std::size_t i = 0; i < store_->entries().size(); ++i) {
      const auto& e = store_->entries()[i];
      if (e.kind == entry_kind::parameter) f(e, store_->param(param_ref{i}), store_->grad(param_ref{i}));
    }
  }

  /// Floating-point operations of the last forward (multiply-adds count 2).
  double forward_flops() const {
    double f = head_.flops();
    for (const auto& b : enc_) f += b.flops();
    for (const auto& b : dec_) f += b.flops();
    for (const auto& b : up_) f += b.flops();
    if constexpr (Gate::attention)
      for (const auto& b : att_) f += b.flops();
    return f;
  }

  /// A readable description: configuration, levels and parameter count.
  std::string summary() const {
    std::ostringstream os;
    os << name() << " (" << reference_name() << ")  in=" << InChannels << " classes=" << Classes << " width=" << cfg_.width
       << " depth=" << cfg_.depth;
    if constexpr (Encoder::recurrent) os << " t=" << cfg_.t;
    os << " up=" << to_string(cfg_.up) << "\n";
    const auto w = widths();
    os << "  encoder: ";
    for (std::size_t i = 0; i < w.size(); ++i) os << (i ? " -> " : "") << Encoder::encoder_prefix << (i + 1) << "(" << w[i] << ")";
    os << "\n  decoder: ";
    for (std::size_t i = w.size() - 1; i >= 1; --i) {
      os << "Up" << (i + 1) << "(" << w[i] << "->" << w[i - 1] << ")";
      if constexpr (Gate::attention) os << " Att" << (i + 1) << "(F_int=" << w[i - 1] / 2 << ")";
      os << " " << Encoder::decoder_prefix << (i + 1) << "(" << 2 * w[i - 1] << "->" << w[i - 1] << ")" << (i > 1 ? "; " : "");
    }
    os << "\n  head: Conv_1x1(" << w[0] << "->" << Classes << ")\n";
    os << "  parameters: " << store_->num_parameters() << " in " << store_->entries().size() << " named tensors\n";
    return os.str();
  }

  static void validate(const unet_config& cfg) {
    const std::string who = std::string(name()) + ": ";
    if (cfg.depth < 1 || cfg.depth > 8) throw config_error(who + "depth must be in 1..8 (got " + std::to_string(cfg.depth) + ")");
    if (cfg.width < 1 || (static_cast<long long>(cfg.width) << cfg.depth) > (1 << 20))
      throw config_error(who + "width must be >= 1 and width·2^depth at most 2^20 (got width " + std::to_string(cfg.width) + ")");
    if (Gate::attention && cfg.width < 2)
      throw config_error(who + "attention gates need width >= 2 (F_int = width/2 at the top level)");
    if (Encoder::recurrent && cfg.t < 1) throw config_error(who + "t must be >= 1 (got " + std::to_string(cfg.t) + ")");
  }

 private:
  /// The up-convolution of level i-1 reads the bottom encoder's output (i = depth) or the
  /// decoder block of level i.
  block_t& up_input(std::size_t i) { return i == static_cast<std::size_t>(cfg_.depth) ? enc_[i] : dec_[i]; }
  /// After level l's decoder (and gate) have read them: the skip and the up-convolution's output.
  void drop_level_outputs(std::size_t l) {
    up_[l].drop_output();
    enc_[l].drop_output();
  }
  /// Run the forward again on the same input (a second backward), leaving the batch norms'
  /// running statistics and counters as they were.
  void replay(context<B>& ctx) {
    tensor<B> buffers(store_->flat_buffers().dims());
    ops<B>::copy(buffers.data(), store_->flat_buffers().data(), buffers.size());
    const std::vector<std::int64_t> counters = store_->counters();
    const bool was_training = is_training();
    auto put_back = [&] {
      train(was_training);
      ops<B>::copy(store_->flat_buffers().data(), buffers.data(), buffers.size());
      store_->counters() = counters;
    };
    train(true);
    try {
      run(ctx, *in_, true);
    } catch (...) {
      put_back();
      throw;
    }
    put_back();
  }

  void build() {
    param_store<B>& s = *store_;
    const auto w = widths();
    const std::size_t D = static_cast<std::size_t>(cfg_.depth);
    const std::string ep = Encoder::encoder_prefix, dp = Encoder::decoder_prefix;
    for (std::size_t i = 0; i <= D; ++i)
      enc_.emplace_back(s, ep + std::to_string(i + 1), i == 0 ? InChannels : w[i - 1], w[i], cfg_.t);
    up_.resize(D);
    dec_.resize(D);
    if constexpr (Gate::attention) att_.resize(D);
    for (std::size_t i = D; i >= 1; --i) {  // PyTorch registration order: Up5, Att5, Up_conv5, Up4, ...
      const std::string lvl = std::to_string(i + 1);
      up_[i - 1] = up_conv<B>(s, "Up" + lvl, w[i], w[i - 1], cfg_.up);
      if constexpr (Gate::attention) att_[i - 1] = attention_gate<B>(s, "Att" + lvl, w[i - 1], w[i - 1], w[i - 1] / 2);
      dec_[i - 1] = block_t(s, dp + lvl, 2 * w[i - 1], w[i - 1], cfg_.t);
    }
    head_ = conv2d<B, 1, true>(s, "Conv_1x1", w[0], Classes);
    pool_.resize(D);
    cat_.resize(D);
    skips_.assign(D + 1, nullptr);
    skip_grads_.assign(D, nullptr);
    gsum_.resize(D);
    esum_.resize(D);
    s.finalize(cfg_.seed);
  }

  unet_config cfg_;
  std::unique_ptr<param_store<B>> store_;
  std::unique_ptr<context<B>> own_ctx_;
  context<B>* ctx_ = nullptr;
  std::vector<block_t> enc_, dec_;
  std::vector<up_conv<B>> up_;
  std::vector<attention_gate<B>> att_;
  std::vector<max_pool2x2<B>> pool_;
  std::vector<concat<B>> cat_;
  conv2d<B, 1, true> head_;
  std::vector<const tensor<B>*> skips_, skip_grads_;
  std::vector<tensor<B>> gsum_, esum_;
  tensor<B> xpad_, out_, gpad_, gx_;
  shape in_dims_{};
  bool padded_ = false;
  bool have_state_ = false;
  bool drop_ = false;          // the last forward dropped block outputs (train mode, for a backward)
  bool backward_ran_ = false;  // a backward has run since the last forward
  const tensor<B>* in_ = nullptr;
  int top_ = 0, left_ = 0;
};

}  // namespace useg
