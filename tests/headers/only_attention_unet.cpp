// Compiles <useg/attention_unet.hpp> in a translation unit that includes nothing else, and instantiates a model.
#include <useg/attention_unet.hpp>

int useg_header_check_attention_unet() {
  useg::unet_config cfg;
  cfg.width = 2;
  cfg.depth = 1;
  useg::attention_unet<useg::cpu, 1, 1> m(cfg);
  useg::tensor<useg::cpu> x(2, 1, 4, 4);
  x.fill(0.5f);
  const auto& y = m.forward(x);
  m.backward(y);
  return static_cast<int>(m.num_parameters());
}
