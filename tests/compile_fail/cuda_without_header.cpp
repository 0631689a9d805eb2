// useg::cuda used without <useg/backend/cuda.hpp>: the error must say what to include.
#include <useg/unet.hpp>
useg::tensor<useg::cuda> t(1, 1, 2, 2);
