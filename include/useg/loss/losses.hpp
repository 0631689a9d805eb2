// useg/loss/losses.hpp — segmentation losses on logits. Each returns the loss value and, when
// `grad` is non-null, writes dLoss/dlogits into it (resized to the logits' shape).
//
//   bce_with_logits_loss: mean BCE on logits (stable), optional pos_weight (PyTorch semantics)
//   dice_loss:            soft Dice; 1 channel: sigmoid, over the whole batch (smooth = 1, as in
//                         Buda et al.); C > 1 channels: softmax, mean over classes, class-index targets
//   bce_dice_loss:        bce_weight·BCE + dice_weight·Dice (binary)
//   cross_entropy_loss:   mean softmax cross-entropy, class-index targets (n, 1, h, w)
#pragma once
#include <string>
#include <type_traits>

#include "useg/core/error.hpp"
#include "useg/core/tensor.hpp"

namespace useg {

namespace detail {
template <class B>
void check_binary_target(const tensor<B>& logits, const tensor<B>& target, const char* who) {
  require_nchw(logits, -1, who);
  if (target.dims() != logits.dims())
    throw shape_error(std::string(who) + ": target shape " + target.dims().str() + " differs from logits " + logits.dims().str());
}
template <class B>
void check_index_target(context<B>& ctx, const tensor<B>& logits, const tensor<B>& target, const char* who) {
  require_nchw(logits, -1, who);
  const shape want = shape::nchw(logits.n(), 1, logits.h(), logits.w());
  if (target.dims() != want)
    throw shape_error(std::string(who) + ": class-index target must have shape " + want.str() + ", got " + target.dims().str());
  if (!ops<B>::class_indices_valid(ctx, target.data(), target.size(), logits.c()))
    throw shape_error(std::string(who) + ": target holds values that are not class indices in [0, " +
                      std::to_string(logits.c()) + ")");
}
template <class B>
typename B::scalar* prepare_grad(const tensor<B>& logits, tensor<B>* grad) {
  if (!grad) return nullptr;
  grad->resize(logits.dims());
  grad->fill(0);
  return grad->data();
}
}  // namespace detail

template <class B>
double bce_with_logits_loss(context<B>& ctx, const tensor<B>& logits, const tensor<B>& target, std::type_identity_t<tensor<B>>* grad = nullptr,
                            double pos_weight = 1.0) {
  detail::check_binary_target(logits, target, "useg::bce_with_logits_loss");
  auto* g = detail::prepare_grad(logits, grad);
  return ops<B>::bce_with_logits(ctx, logits.data(), target.data(), logits.size(), pos_weight, g, 1.0);
}

template <class B>
double dice_loss(context<B>& ctx, const tensor<B>& logits, const tensor<B>& target, std::type_identity_t<tensor<B>>* grad = nullptr,
                 double smooth = 1.0) {
  if (logits.rank() == 4 && logits.c() > 1) {
    detail::check_index_target(ctx, logits, target, "useg::dice_loss");
    auto* g = detail::prepare_grad(logits, grad);
    return ops<B>::dice_multiclass(ctx, logits.n(), logits.c(), logits.dims().hw(), logits.data(), target.data(), smooth, g, 1.0);
  }
  detail::check_binary_target(logits, target, "useg::dice_loss");
  auto* g = detail::prepare_grad(logits, grad);
  return ops<B>::dice_binary(ctx, logits.data(), target.data(), logits.size(), smooth, g, 1.0);
}

template <class B>
double bce_dice_loss(context<B>& ctx, const tensor<B>& logits, const tensor<B>& target, std::type_identity_t<tensor<B>>* grad = nullptr,
                     double bce_weight = 1.0, double dice_weight = 1.0, double pos_weight = 1.0, double smooth = 1.0) {
  detail::check_binary_target(logits, target, "useg::bce_dice_loss");
  auto* g = detail::prepare_grad(logits, grad);
  const double a = ops<B>::bce_with_logits(ctx, logits.data(), target.data(), logits.size(), pos_weight, g, bce_weight);
  const double b = ops<B>::dice_binary(ctx, logits.data(), target.data(), logits.size(), smooth, g, dice_weight);
  return bce_weight * a + dice_weight * b;
}

template <class B>
double cross_entropy_loss(context<B>& ctx, const tensor<B>& logits, const tensor<B>& target, std::type_identity_t<tensor<B>>* grad = nullptr) {
  detail::check_index_target(ctx, logits, target, "useg::cross_entropy_loss");
  auto* g = detail::prepare_grad(logits, grad);
  return ops<B>::cross_entropy(ctx, logits.n(), logits.c(), logits.dims().hw(), logits.data(), target.data(), g, 1.0);
}

/// The losses by name, for programs that choose at run time.
enum class loss_kind { bce, dice, bce_dice, cross_entropy };

inline loss_kind parse_loss_kind(const std::string& s) {
  if (s == "bce") return loss_kind::bce;
  if (s == "dice") return loss_kind::dice;
  if (s == "bce-dice" || s == "bce_dice") return loss_kind::bce_dice;
  if (s == "ce" || s == "cross-entropy" || s == "cross_entropy") return loss_kind::cross_entropy;
  throw config_error("unknown loss '" + s + "' (expected bce, dice, bce-dice or cross-entropy)");
}

struct loss_options {
  loss_kind kind = loss_kind::bce_dice;
  double pos_weight = 1.0;
  double smooth = 1.0;
  double bce_weight = 1.0;
  double dice_weight = 1.0;
};

/// Evaluate the configured loss.
template <class B>
double compute_loss(context<B>& ctx, const loss_options& o, const tensor<B>& logits, const tensor<B>& target,
                    std::type_identity_t<tensor<B>>* grad = nullptr) {
  switch (o.kind) {
    case loss_kind::bce: return bce_with_logits_loss(ctx, logits, target, grad, o.pos_weight);
    case loss_kind::dice: return dice_loss(ctx, logits, target, grad, o.smooth);
    case loss_kind::bce_dice:
      if (logits.rank() == 4 && logits.c() > 1) {
        // multi-class: cross-entropy + softmax Dice
        tensor<B> g2;
        const double a = cross_entropy_loss(ctx, logits, target, grad);
        const double b = dice_loss(ctx, logits, target, grad ? &g2 : nullptr, o.smooth);
        if (grad) {
          ops<B>::scale(ctx, grad->data(), static_cast<typename B::scalar>(o.bce_weight), grad->size());
          ops<B>::scale(ctx, g2.data(), static_cast<typename B::scalar>(o.dice_weight), g2.size());
          ops<B>::accumulate(ctx, grad->data(), g2.data(), grad->size());
        }
        return o.bce_weight * a + o.dice_weight * b;
      }
      return bce_dice_loss(ctx, logits, target, grad, o.bce_weight, o.dice_weight, o.pos_weight, o.smooth);
    case loss_kind::cross_entropy: return cross_entropy_loss(ctx, logits, target, grad);
  }
  return 0;
}

}  // namespace useg
