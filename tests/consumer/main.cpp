#include <useg/ar2unet.hpp>

#include <cstdio>

int main() {
  useg::unet_config cfg;
  cfg.width = 4;
  cfg.depth = 2;
  useg::ar2unet<useg::cpu, 3, 1> net(cfg);
  useg::tensor<useg::cpu> x(2, 3, 20, 12);
  x.fill(0.25f);
  const auto& y = net.forward(x);
  if (y.dims() != useg::shape({2, 1, 20, 12})) return 1;
  std::printf("consumer ok: %zu parameters\n", net.num_parameters());
  return 0;
}
