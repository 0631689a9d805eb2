// Each entry header was compiled alone in its own translation unit (headers/only_*.cpp); here we
// check that the model each of them instantiated really runs.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

int useg_header_check_unet();
int useg_header_check_attention_unet();
int useg_header_check_r2unet();
int useg_header_check_ar2unet();
int useg_header_check_useg();

TEST_CASE("each entry header compiles alone and its model runs") {
  CHECK(useg_header_check_unet() > 0);
  CHECK(useg_header_check_attention_unet() > useg_header_check_unet());
  CHECK(useg_header_check_r2unet() > 0);
  CHECK(useg_header_check_ar2unet() > useg_header_check_r2unet());
  CHECK(useg_header_check_useg() == useg_header_check_ar2unet());
}
