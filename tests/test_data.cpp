// Tests of useg::data: the TIFF reader/writer (fixtures written here with raw libtiff calls, so
// the expected pixels never come from the code under test), the kaggle_3m layout scan, slice
// preprocessing, the patient split and the batch loader.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
#include <tiffio.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <useg/data/loader.hpp>

namespace fs = std::filesystem;
using namespace useg::data;

namespace {

/// A fresh scratch folder per test case.
struct scratch {
  fs::path dir;
  explicit scratch(const std::string& name) {
    dir = fs::temp_directory_path() / ("useg_test_data_" + std::to_string(::getpid()) + "_" + name);
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~scratch() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::string operator/(const std::string& f) const { return (dir / f).string(); }
};

std::uint8_t pattern(std::size_t y, std::size_t x, std::size_t c) { return static_cast<std::uint8_t>((y * 7 + x * 13 + c * 50) % 256); }

struct raw_opts {
  std::uint16_t compression = COMPRESSION_NONE;
  bool tiled = false;
  bool planar_separate = false;
  std::uint32_t rows_per_strip = 0;  // 0: all rows in one strip
  int photometric = -1;              // -1: by channel count
  std::uint16_t predictor = 0;
};

/// Write an 8-bit image with libtiff directly. data: (h, w, c) interleaved.
void write_raw(const std::string& path, std::size_t W, std::size_t H, std::size_t C, const std::vector<std::uint8_t>& data,
               raw_opts o = {}) {
  TIFF* t = TIFFOpen(path.c_str(), "w");
  REQUIRE(t);
  TIFFSetField(t, TIFFTAG_IMAGEWIDTH, static_cast<std::uint32_t>(W));
  TIFFSetField(t, TIFFTAG_IMAGELENGTH, static_cast<std::uint32_t>(H));
  TIFFSetField(t, TIFFTAG_SAMPLESPERPIXEL, static_cast<std::uint16_t>(C));
  TIFFSetField(t, TIFFTAG_BITSPERSAMPLE, static_cast<std::uint16_t>(8));
  TIFFSetField(t, TIFFTAG_PHOTOMETRIC,
               static_cast<std::uint16_t>(o.photometric >= 0 ? o.photometric : (C == 3 ? PHOTOMETRIC_RGB : PHOTOMETRIC_MINISBLACK)));
  TIFFSetField(t, TIFFTAG_PLANARCONFIG, static_cast<std::uint16_t>(o.planar_separate ? PLANARCONFIG_SEPARATE : PLANARCONFIG_CONTIG));
  TIFFSetField(t, TIFFTAG_COMPRESSION, o.compression);
  if (o.predictor) TIFFSetField(t, TIFFTAG_PREDICTOR, o.predictor);
  if (o.tiled) {
    const std::uint32_t tw = 16, th = 16;
    TIFFSetField(t, TIFFTAG_TILEWIDTH, tw);
    TIFFSetField(t, TIFFTAG_TILELENGTH, th);
    REQUIRE(!o.planar_separate);
    std::vector<std::uint8_t> tile(tw * th * C);
    for (std::uint32_t y = 0; y < H; y += th)
      for (std::uint32_t x = 0; x < W; x += tw) {
        std::fill(tile.begin(), tile.end(), 0);
        for (std::uint32_t r = 0; r < th && y + r < H; ++r)
          for (std::uint32_t q = 0; q < tw && x + q < W; ++q)
            for (std::size_t c = 0; c < C; ++c) tile[(r * tw + q) * C + c] = data[((y + r) * W + x + q) * C + c];
        REQUIRE(TIFFWriteTile(t, tile.data(), x, y, 0, 0) >= 0);
      }
  } else {
    TIFFSetField(t, TIFFTAG_ROWSPERSTRIP, o.rows_per_strip ? o.rows_per_strip : static_cast<std::uint32_t>(H));
    if (o.planar_separate) {
      std::vector<std::uint8_t> row(W);
      for (std::size_t c = 0; c < C; ++c)
        for (std::size_t y = 0; y < H; ++y) {
          for (std::size_t x = 0; x < W; ++x) row[x] = data[(y * W + x) * C + c];
          REQUIRE(TIFFWriteScanline(t, row.data(), static_cast<std::uint32_t>(y), static_cast<std::uint16_t>(c)) >= 0);
        }
    } else {
      std::vector<std::uint8_t> row(W * C);
      for (std::size_t y = 0; y < H; ++y) {
        std::copy(data.begin() + static_cast<std::ptrdiff_t>(y * W * C), data.begin() + static_cast<std::ptrdiff_t>((y + 1) * W * C), row.begin());
        REQUIRE(TIFFWriteScanline(t, row.data(), static_cast<std::uint32_t>(y), 0) >= 0);
      }
    }
  }
  TIFFClose(t);
}

std::vector<std::uint8_t> make_pattern(std::size_t W, std::size_t H, std::size_t C) {
  std::vector<std::uint8_t> v(W * H * C);
  for (std::size_t y = 0; y < H; ++y)
    for (std::size_t x = 0; x < W; ++x)
      for (std::size_t c = 0; c < C; ++c) v[(y * W + x) * C + c] = pattern(y, x, c);
  return v;
}

void check_pattern(const image_u8& img, std::size_t W, std::size_t H, std::size_t C) {
  REQUIRE(img.shape()[0] == H);
  REQUIRE(img.shape()[1] == W);
  REQUIRE(img.shape()[2] == C);
  std::size_t bad = 0;
  for (std::size_t y = 0; y < H; ++y)
    for (std::size_t x = 0; x < W; ++x)
      for (std::size_t c = 0; c < C; ++c) bad += img(y, x, c) != pattern(y, x, c);
  CHECK(bad == 0);
}

void write_text(const std::string& path, const std::string& s) { std::ofstream(path) << s; }

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const useg::error& e) {
    return e.what();
  }
  return "";
}

/// A kaggle_3m-like slice: RGB image with channel c = base + c*10, mask with a square of 255.
void write_slice(const fs::path& dir, const std::string& patient, int n, std::size_t S, std::uint8_t base, std::size_t lesion) {
  fs::create_directories(dir / patient);
  std::vector<std::uint8_t> img(S * S * 3), mask(S * S, 0);
  for (std::size_t p = 0; p < S * S; ++p)
    for (std::size_t c = 0; c < 3; ++c) img[p * 3 + c] = static_cast<std::uint8_t>(base + c * 10);
  for (std::size_t y = 0; y < lesion; ++y)
    for (std::size_t x = 0; x < lesion; ++x) mask[y * S + x] = 255;
  const std::string stem = (dir / patient / (patient + "_" + std::to_string(n))).string();
  write_raw(stem + ".tif", S, S, 3, img, {COMPRESSION_ADOBE_DEFLATE});
  write_raw(stem + "_mask.tif", S, S, 1, mask);
}

}  // namespace

// =========================================================================== TIFF reading

TEST_CASE("read_tiff_u8: gray and RGB, uncompressed and compressed, strips and tiles, planar") {
  scratch s("read_variants");
  const std::size_t W = 37, H = 21;
  struct variant {
    const char* name;
    std::size_t C;
    raw_opts o;
  };
  const variant variants[] = {
      {"gray_none_strips3", 1, {COMPRESSION_NONE, false, false, 3}},
      {"gray_none_tiled", 1, {COMPRESSION_NONE, true}},
      {"gray_packbits", 1, {COMPRESSION_PACKBITS}},
      {"gray_deflate_pred", 1, {COMPRESSION_ADOBE_DEFLATE, false, false, 0, -1, PREDICTOR_HORIZONTAL}},
      {"rgb_none", 3, {COMPRESSION_NONE}},
      {"rgb_deflate_pred", 3, {COMPRESSION_ADOBE_DEFLATE, false, false, 5, -1, PREDICTOR_HORIZONTAL}},
      {"rgb_lzw_tiled", 3, {COMPRESSION_LZW, true}},
      {"gray_deflate_tiled", 1, {COMPRESSION_ADOBE_DEFLATE, true}},
      {"rgb_planar_separate", 3, {COMPRESSION_NONE, false, true}},
  };
  for (const auto& v : variants) {
    CAPTURE(std::string(v.name));
    const std::string p = s / (std::string(v.name) + ".tif");
    write_raw(p, W, H, v.C, make_pattern(W, H, v.C), v.o);
    check_pattern(read_tiff_u8(p), W, H, v.C);
    const tiff_info info = read_tiff_info(p);
    CHECK(info.width == static_cast<int>(W));
    CHECK(info.height == static_cast<int>(H));
    CHECK(info.samples == static_cast<int>(v.C));
    CHECK(info.tiled == v.o.tiled);
  }
}

TEST_CASE("read_tiff_u8: min-is-white gray reads as intensities") {
  scratch s("miniswhite");
  const std::vector<std::uint8_t> v{0, 10, 200, 255};
  write_raw(s / "w.tif", 2, 2, 1, v, {COMPRESSION_NONE, false, false, 0, PHOTOMETRIC_MINISWHITE});
  const image_u8 img = read_tiff_u8(s / "w.tif");
  CHECK(img(0, 0, 0) == 255);
  CHECK(img(0, 1, 0) == 245);
  CHECK(img(1, 0, 0) == 55);
  CHECK(img(1, 1, 0) == 0);
}

TEST_CASE("read_tiff_u8: broken files are io_errors naming the file") {
  scratch s("broken");
  const std::size_t W = 64, H = 64;
  // missing
  std::string e = error_of([&] { read_tiff_u8(s / "nope.tif"); });
  CHECK(e.find("nope.tif") != std::string::npos);
  CHECK(e.find("not found") != std::string::npos);
  // empty
  write_text(s / "empty.tif", "");
  e = error_of([&] { read_tiff_u8(s / "empty.tif"); });
  CHECK(e.find("empty.tif") != std::string::npos);
  CHECK(e.find("empty") != std::string::npos);
  // not a TIFF at all
  write_text(s / "garbage.tif", "this is not a TIFF file, just some text that is long enough");
  e = error_of([&] { read_tiff_u8(s / "garbage.tif"); });
  CHECK(e.find("garbage.tif") != std::string::npos);
  // truncated: uncompressed and compressed, cut in the middle of the pixel data
  for (auto comp : {COMPRESSION_NONE, COMPRESSION_ADOBE_DEFLATE}) {
    CAPTURE(comp);
    const std::string full = s / "full.tif", cut = s / "cut.tif";
    std::vector<std::uint8_t> noisy(W * H * 3);
    useg::rng g(3);
    for (auto& b : noisy) b = static_cast<std::uint8_t>(g.below(256));
    write_raw(full, W, H, 3, noisy, {static_cast<std::uint16_t>(comp)});
    std::ifstream in(full, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // the directory may sit at the end of the file, so cut at a fraction that keeps the header
    // and drops part of the strip: the reader must fail cleanly either way
    for (double frac : {0.5, 0.9}) {
      std::ofstream(cut, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size() * frac));
      e = error_of([&] { read_tiff_u8(cut); });
      CHECK(e.find("cut.tif") != std::string::npos);
    }
  }
  // float data given to the 8-bit reader
  write_tiff(s / "f.tif", image_f32(xt::xtensor<float, 3>::from_shape({2, 2, 1})));
  e = error_of([&] { read_tiff_u8(s / "f.tif"); });
  CHECK(e.find("floating-point") != std::string::npos);
}

TEST_CASE("write_tiff: 8-bit gray/RGB and float32 round trips, checked with raw libtiff") {
  scratch s("write");
  const std::size_t W = 19, H = 11;
  for (auto comp : {tiff_compression::none, tiff_compression::deflate, tiff_compression::lzw, tiff_compression::packbits})
    for (std::size_t C : {std::size_t{1}, std::size_t{3}}) {
      CAPTURE(static_cast<int>(comp));
      CAPTURE(C);
      image_u8 img = image_u8::from_shape({H, W, C});
      for (std::size_t y = 0; y < H; ++y)
        for (std::size_t x = 0; x < W; ++x)
          for (std::size_t c = 0; c < C; ++c) img(y, x, c) = pattern(y, x, c);
      const std::string p = s / "w.tif";
      write_tiff(p, img, comp);
      CHECK(!fs::exists(p + ".tmp"));
      TIFF* t = TIFFOpen(p.c_str(), "r");
      REQUIRE(t);
      std::uint16_t spp = 0, bps = 0;
      TIFFGetField(t, TIFFTAG_SAMPLESPERPIXEL, &spp);
      TIFFGetField(t, TIFFTAG_BITSPERSAMPLE, &bps);
      CHECK(spp == C);
      CHECK(bps == 8);
      std::vector<std::uint8_t> row(static_cast<std::size_t>(TIFFScanlineSize(t)));
      std::size_t bad = 0;
      for (std::uint32_t y = 0; y < H; ++y) {
        REQUIRE(TIFFReadScanline(t, row.data(), y, 0) >= 0);
        for (std::size_t x = 0; x < W; ++x)
          for (std::size_t c = 0; c < C; ++c) bad += row[x * C + c] != pattern(y, x, c);
      }
      TIFFClose(t);
      CHECK(bad == 0);
    }
  // float32: write with raw libtiff (strips and tiles), read with read_tiff_f32; and the reverse
  const std::size_t FW = 20, FH = 18;
  auto fval = [](std::size_t y, std::size_t x) { return static_cast<float>(y) * 0.25f - static_cast<float>(x) * 1.5f + 0.125f; };
  for (bool tiled : {false, true}) {
    CAPTURE(tiled);
    const std::string p = s / "raw_f.tif";
    TIFF* t = TIFFOpen(p.c_str(), "w");
    REQUIRE(t);
    TIFFSetField(t, TIFFTAG_IMAGEWIDTH, static_cast<std::uint32_t>(FW));
    TIFFSetField(t, TIFFTAG_IMAGELENGTH, static_cast<std::uint32_t>(FH));
    TIFFSetField(t, TIFFTAG_SAMPLESPERPIXEL, static_cast<std::uint16_t>(1));
    TIFFSetField(t, TIFFTAG_BITSPERSAMPLE, static_cast<std::uint16_t>(32));
    TIFFSetField(t, TIFFTAG_SAMPLEFORMAT, static_cast<std::uint16_t>(SAMPLEFORMAT_IEEEFP));
    TIFFSetField(t, TIFFTAG_PHOTOMETRIC, static_cast<std::uint16_t>(PHOTOMETRIC_MINISBLACK));
    TIFFSetField(t, TIFFTAG_COMPRESSION, static_cast<std::uint16_t>(COMPRESSION_ADOBE_DEFLATE));
    if (tiled) {
      TIFFSetField(t, TIFFTAG_TILEWIDTH, 16u);
      TIFFSetField(t, TIFFTAG_TILELENGTH, 16u);
      std::vector<float> tile(256);
      for (std::uint32_t y = 0; y < FH; y += 16)
        for (std::uint32_t x = 0; x < FW; x += 16) {
          for (std::uint32_t r = 0; r < 16; ++r)
            for (std::uint32_t q = 0; q < 16; ++q) tile[r * 16 + q] = (y + r < FH && x + q < FW) ? fval(y + r, x + q) : 0.f;
          REQUIRE(TIFFWriteTile(t, tile.data(), x, y, 0, 0) >= 0);
        }
    } else {
      TIFFSetField(t, TIFFTAG_ROWSPERSTRIP, 4u);
      std::vector<float> row(FW);
      for (std::uint32_t y = 0; y < FH; ++y) {
        for (std::size_t x = 0; x < FW; ++x) row[x] = fval(y, x);
        REQUIRE(TIFFWriteScanline(t, row.data(), y, 0) >= 0);
      }
    }
    TIFFClose(t);
    const image_f32 f = read_tiff_f32(p);
    REQUIRE(f.shape()[0] == FH);
    REQUIRE(f.shape()[1] == FW);
    std::size_t bad = 0;
    for (std::size_t y = 0; y < FH; ++y)
      for (std::size_t x = 0; x < FW; ++x) bad += f(y, x, 0) != fval(y, x);
    CHECK(bad == 0);
  }
  image_f32 f = image_f32::from_shape({FH, FW, std::size_t{1}});
  for (std::size_t y = 0; y < FH; ++y)
    for (std::size_t x = 0; x < FW; ++x) f(y, x, 0) = fval(y, x);
  write_tiff(s / "ours_f.tif", f);
  TIFF* t = TIFFOpen((s / "ours_f.tif").c_str(), "r");
  REQUIRE(t);
  std::uint16_t fmt = 0;
  TIFFGetField(t, TIFFTAG_SAMPLEFORMAT, &fmt);
  CHECK(fmt == SAMPLEFORMAT_IEEEFP);
  std::vector<float> row(FW);
  std::size_t bad = 0;
  for (std::uint32_t y = 0; y < FH; ++y) {
    REQUIRE(TIFFReadScanline(t, row.data(), y, 0) >= 0);
    for (std::size_t x = 0; x < FW; ++x) bad += row[x] != fval(y, x);
  }
  TIFFClose(t);
  CHECK(bad == 0);
  CHECK_THROWS_AS(write_tiff(s / "bad.tif", image_u8(image_u8::from_shape({2, 2, 2}))), useg::io_error);
}

// =========================================================================== layout

TEST_CASE("scan_dataset: kaggle_3m layout, numeric slice order, other files ignored") {
  scratch s("scan");
  const fs::path root = s.dir / "kaggle_3m";
  for (int n : {10, 2, 1, 11}) write_slice(root, "TCGA_AA_0001_20000101", n, 8, 10, 2);
  for (int n : {3, 1}) write_slice(root, "TCGA_BB_0002_20000101", n, 8, 20, 0);
  write_text((root / "README.md").string(), "readme");
  write_text((root / "data.csv").string(), "Patient\n");
  write_text((root / "TCGA_AA_0001_20000101" / "notes.txt").string(), "x");
  const dataset_index idx = scan_dataset(root.string());
  REQUIRE(idx.patients.size() == 2);
  CHECK(idx.patients[0].id == "TCGA_AA_0001_20000101");
  CHECK(idx.patients[1].id == "TCGA_BB_0002_20000101");
  std::vector<int> order;
  for (const auto& sl : idx.patients[0].slices) order.push_back(sl.number);
  CHECK(order == std::vector<int>{1, 2, 10, 11});
  CHECK(idx.patients[0].slices[2].image.find("TCGA_AA_0001_20000101_10.tif") != std::string::npos);
  CHECK(idx.patients[0].slices[2].mask.find("TCGA_AA_0001_20000101_10_mask.tif") != std::string::npos);
  CHECK(idx.num_slices() == 6);
  CHECK(idx.warnings.empty());
  // one patient folder and one file
  const dataset_index one = scan_dataset((root / "TCGA_BB_0002_20000101").string());
  REQUIRE(one.patients.size() == 1);
  CHECK(one.patients[0].id == "TCGA_BB_0002_20000101");
  CHECK(one.patients[0].slices.size() == 2);
  const dataset_index file = scan_dataset((root / "TCGA_BB_0002_20000101" / "TCGA_BB_0002_20000101_3.tif").string());
  REQUIRE(file.patients.size() == 1);
  CHECK(file.patients[0].slices.size() == 1);
  CHECK(file.patients[0].slices[0].number == 3);
  CHECK(!file.patients[0].slices[0].mask.empty());
}

TEST_CASE("scan_dataset: image without mask, stray mask, empty folders: errors or skipped with warnings") {
  scratch s("scan_bad");
  const fs::path root = s.dir / "data";
  write_slice(root, "P1", 1, 8, 10, 2);
  write_slice(root, "P1", 2, 8, 10, 2);
  fs::remove(root / "P1" / "P1_2_mask.tif");
  std::string e = error_of([&] { scan_dataset(root.string()); });
  CHECK(e.find("P1_2.tif") != std::string::npos);
  CHECK(e.find("without a mask") != std::string::npos);
  // skip: slice 2 dropped with a warning
  dataset_index idx = scan_dataset(root.string(), {true, true});
  REQUIRE(idx.patients.size() == 1);
  CHECK(idx.patients[0].slices.size() == 1);
  CHECK(idx.skipped == 1);
  REQUIRE(idx.warnings.size() == 1);
  CHECK(idx.warnings[0].find("P1_2.tif") != std::string::npos);
  // masks not required (prediction): slice 2 kept without a mask
  idx = scan_dataset(root.string(), {false, false});
  REQUIRE(idx.patients[0].slices.size() == 2);
  CHECK(idx.patients[0].slices[1].mask.empty());
  // a mask without an image
  write_slice(root, "P2", 1, 8, 10, 2);
  fs::remove(root / "P2" / "P2_1.tif");
  e = error_of([&] { scan_dataset(root.string(), {false, false}); });
  CHECK(e.find("P2_1_mask.tif") != std::string::npos);
  CHECK(e.find("mask without an image") != std::string::npos);
  fs::remove_all(root / "P2");
  // an empty patient folder
  fs::create_directories(root / "P3");
  e = error_of([&] { scan_dataset(root.string(), {false, false}); });
  CHECK(e.find("P3") != std::string::npos);
  CHECK(e.find("no TIFF slices") != std::string::npos);
  idx = scan_dataset(root.string(), {false, true});
  CHECK(idx.patients.size() == 1);
  CHECK(idx.skipped == 1);
  fs::remove_all(root / "P3");
  // a TIFF whose name has no slice number
  write_slice(root, "P4", 1, 8, 10, 2);
  fs::copy_file(root / "P4" / "P4_1.tif", root / "P4" / "scan.tif");
  e = error_of([&] { scan_dataset(root.string(), {false, false}); });
  CHECK(e.find("scan.tif") != std::string::npos);
  // an empty dataset folder, and a missing one
  fs::create_directories(s.dir / "nothing");
  e = error_of([&] { scan_dataset((s.dir / "nothing").string()); });
  CHECK(e.find("no slices found") != std::string::npos);
  e = error_of([&] { scan_dataset((s.dir / "missing").string()); });
  CHECK(e.find("missing") != std::string::npos);
}

// =========================================================================== preprocessing

TEST_CASE("resize: bilinear with half-pixel centers and nearest, by hand") {
  // 1-D: [0, 100] -> 4: x=0 clamps to 0; x=1: 0.25 -> 25; x=2: 0.75 -> 75; x=3 clamps to 100
  image_u8 a = image_u8::from_shape({1, 2, 1});
  a(0, 0, 0) = 0;
  a(0, 1, 0) = 100;
  image_u8 up = resize_bilinear(a, 1, 4);
  CHECK(up(0, 0, 0) == 0);
  CHECK(up(0, 1, 0) == 25);
  CHECK(up(0, 2, 0) == 75);
  CHECK(up(0, 3, 0) == 100);
  // 4x4 -> 2x2 averages 2x2 blocks (sample points fall at block centers)
  image_u8 b = image_u8::from_shape({4, 4, 1});
  for (std::size_t y = 0; y < 4; ++y)
    for (std::size_t x = 0; x < 4; ++x) b(y, x, 0) = static_cast<std::uint8_t>(10 * y + x);
  image_u8 down = resize_bilinear(b, 2, 2);
  CHECK(down(0, 0, 0) == 6);   // (0+1+10+11)/4 = 5.5 -> 6
  CHECK(down(0, 1, 0) == 8);   // (2+3+12+13)/4 = 7.5 -> 8
  CHECK(down(1, 0, 0) == 26);  // (20+21+30+31)/4 = 25.5 -> 26
  CHECK(down(1, 1, 0) == 28);
  // nearest: 4 -> 2 takes pixels 1 and 3 (nearest centers to 1.0 and 3.0 are ties resolved up);
  // 2 -> 4 repeats each pixel twice
  mask_u8 m = mask_u8::from_shape({1, 4});
  m(0, 0) = 0, m(0, 1) = 1, m(0, 2) = 0, m(0, 3) = 1;
  mask_u8 md = resize_nearest(m, 1, 2);
  CHECK(md(0, 0) == 1);
  CHECK(md(0, 1) == 1);
  mask_u8 m2 = mask_u8::from_shape({1, 2});
  m2(0, 0) = 1, m2(0, 1) = 0;
  mask_u8 mu = resize_nearest(m2, 1, 4);
  CHECK(mu(0, 0) == 1);
  CHECK(mu(0, 1) == 1);
  CHECK(mu(0, 2) == 0);
  CHECK(mu(0, 3) == 0);
  // float plane
  const float fp[2] = {0.f, 1.f};
  const std::vector<float> fu = resize_bilinear(fp, 1, 2, 1, 4);
  CHECK(fu[1] == doctest::Approx(0.25));
  CHECK(fu[2] == doctest::Approx(0.75));
}

TEST_CASE("load_slice: masks 0/255 -> 0/1, other values an error or thresholded; channel choice; mismatches") {
  scratch s("load_slice");
  const std::size_t S = 6;
  std::vector<std::uint8_t> img(S * S * 3);
  for (std::size_t p = 0; p < S * S; ++p)
    for (std::size_t c = 0; c < 3; ++c) img[p * 3 + c] = static_cast<std::uint8_t>(p + 100 * c);
  std::vector<std::uint8_t> mask(S * S, 0);
  mask[7] = 255;
  write_raw(s / "a_1.tif", S, S, 3, img);
  write_raw(s / "a_1_mask.tif", S, S, 1, mask);
  slice_files f{1, s / "a_1.tif", s / "a_1_mask.tif"};
  slice_data d = load_slice(f, {});
  REQUIRE(d.image.shape()[2] == 3);
  CHECK(d.image(1, 1, 2) == 207);
  CHECK(d.mask(1, 1) == 1);
  CHECK(d.mask(0, 0) == 0);
  CHECK(d.has_mask);
  // FLAIR only: channel 1
  preprocess_options one;
  one.channels = 1;
  d = load_slice(f, one);
  REQUIRE(d.image.shape()[2] == 1);
  CHECK(d.image(1, 1, 0) == 107);
  // non-binary mask
  mask[8] = 128;
  mask[9] = 127;
  write_raw(s / "a_1_mask.tif", S, S, 1, mask);
  std::string e = error_of([&] { load_slice(f, {}); });
  CHECK(e.find("a_1_mask.tif") != std::string::npos);
  CHECK(e.find("128") != std::string::npos);
  preprocess_options thr;
  thr.threshold_masks = true;
  d = load_slice(f, thr);
  CHECK(d.mask(1, 2) == 1);  // 128
  CHECK(d.mask(1, 3) == 0);  // 127
  // size mismatch
  write_raw(s / "a_1_mask.tif", S, S - 1, 1, std::vector<std::uint8_t>(S * (S - 1), 0));
  e = error_of([&] { load_slice(f, {}); });
  CHECK(e.find("a_1_mask.tif") != std::string::npos);
  CHECK(e.find("6x5") != std::string::npos);
  // RGB mask
  write_raw(s / "a_1_mask.tif", S, S, 3, img);
  e = error_of([&] { load_slice(f, {}); });
  CHECK(e.find("3 channels") != std::string::npos);
  // gray image for a 3-channel model
  write_raw(s / "a_1.tif", S, S, 1, std::vector<std::uint8_t>(S * S, 9));
  write_raw(s / "a_1_mask.tif", S, S, 1, std::vector<std::uint8_t>(S * S, 0));
  e = error_of([&] { load_slice(f, {}); });
  CHECK(e.find("a_1.tif") != std::string::npos);
  CHECK(e.find("1 channel") != std::string::npos);
  d = load_slice(f, one);  // fine for a 1-channel model
  CHECK(d.image(0, 0, 0) == 9);
  // resize: image bilinear, mask nearest and still binary
  preprocess_options rs;
  rs.channels = 1;
  rs.size = 3;
  d = load_slice(f, rs);
  CHECK(d.image.shape()[0] == 3);
  CHECK(d.mask.shape()[1] == 3);
}

TEST_CASE("load_slices: in-memory set, tumour counts, per-volume statistics, bad files skipped or fatal") {
  scratch s("load_slices");
  const fs::path root = s.dir / "d";
  write_slice(root, "P1", 1, 8, 10, 2);  // 4 tumour pixels
  write_slice(root, "P1", 2, 8, 30, 0);
  write_slice(root, "P2", 1, 8, 50, 3);  // 9
  const dataset_index idx = scan_dataset(root.string());
  load_options lo;
  lo.threads = 2;
  slice_set set = load_slices(idx, {"P2", "P1"}, lo);
  REQUIRE(set.size() == 3);
  CHECK(set.patients == std::vector<std::string>{"P2", "P1"});
  CHECK(set.records[0].patient == 0);
  CHECK(set.records[0].positives == 9);
  CHECK(set.records[1].number == 1);
  CHECK(set.records[1].positives == 4);
  CHECK(!set.has_tumour(2));
  CHECK(set.bytes() == 3 * 64 * 4);
  // P1: channel 0 has values 10 (64 px) and 30 (64 px): mean 20, std 10
  CHECK(set.mean[1][0] == doctest::Approx(20));
  CHECK(set.stdev[1][0] == doctest::Approx(10));
  CHECK(set.mean[1][2] == doctest::Approx(40));
  // a corrupt image: fatal by default, skipped with skip_bad
  write_text((root / "P1" / "P1_2.tif").string(), "broken");
  std::string e = error_of([&] { load_slices(idx, {"P1", "P2"}, lo); });
  CHECK(e.find("P1_2.tif") != std::string::npos);
  lo.skip_bad = true;
  load_report rep;
  set = load_slices(idx, {"P1", "P2"}, lo, &rep);
  CHECK(set.size() == 2);
  CHECK(rep.loaded == 2);
  CHECK(rep.skipped == 1);
  REQUIRE(rep.warnings.size() == 1);
  CHECK(rep.warnings[0].find("P1_2.tif") != std::string::npos);
  // different sizes without --size
  write_slice(root, "P3", 1, 10, 50, 3);
  const dataset_index idx2 = scan_dataset(root.string());
  lo.skip_bad = false;
  e = error_of([&] { load_slices(idx2, {"P2", "P3"}, lo); });
  CHECK(e.find("P3_1.tif") != std::string::npos);
  CHECK(e.find("--size") != std::string::npos);
  lo.pre.size = 4;
  set = load_slices(idx2, {"P2", "P3"}, lo);
  CHECK(set.height == 4);
  CHECK_THROWS_AS(load_slices(idx2, {"P9"}, lo), useg::config_error);
}

// =========================================================================== split

TEST_CASE("split_patients: deterministic, seeded, patient-level, disjoint") {
  std::vector<std::string> ids;
  for (int i = 0; i < 20; ++i) ids.push_back(std::string("P").append(std::to_string(100 + i)));
  const patient_split a = split_patients(ids, 0.2, 0.1, 7);
  CHECK(a.val.size() == 4);
  CHECK(a.test.size() == 2);
  CHECK(a.train.size() == 14);
  std::set<std::string> all;
  for (const auto* v : {&a.train, &a.val, &a.test}) all.insert(v->begin(), v->end());
  CHECK(all.size() == 20);  // disjoint and complete
  // same seed, shuffled input: the same split
  std::vector<std::string> rev(ids.rbegin(), ids.rend());
  const patient_split b = split_patients(rev, 0.2, 0.1, 7);
  CHECK(a.train == b.train);
  CHECK(a.val == b.val);
  CHECK(a.test == b.test);
  // another seed: another split
  const patient_split c = split_patients(ids, 0.2, 0.1, 8);
  CHECK((c.val != a.val || c.test != a.test));
  // small fractions still give one patient; no test
  const patient_split d = split_patients({"a", "b", "c"}, 0.01, 0.0, 1);
  CHECK(d.val.size() == 1);
  CHECK(d.test.empty());
  CHECK(d.train.size() == 2);
  CHECK_THROWS_AS(split_patients({"a", "b"}, 0.5, 0.5, 1), useg::config_error);
  CHECK_THROWS_AS(split_patients({"a", "b"}, 0.4, 0.4, 1), useg::config_error);
}

TEST_CASE("split files: round trip and errors naming the line") {
  scratch s("splitfile");
  patient_split p{{"A", "B"}, {"C"}, {"D"}};
  write_split_file(s / "split.txt", p);
  const patient_split q = read_split_file(s / "split.txt", {"A", "B", "C", "D", "E"});
  CHECK(q.train == p.train);
  CHECK(q.val == p.val);
  CHECK(q.test == p.test);
  write_text(s / "bad.txt", "# comment\ntrain A\nval A\n");
  std::string e = error_of([&] { read_split_file(s / "bad.txt"); });
  CHECK(e.find("line 3") != std::string::npos);
  CHECK(e.find("twice") != std::string::npos);
  write_text(s / "bad.txt", "train A\nholdout B\n");
  e = error_of([&] { read_split_file(s / "bad.txt"); });
  CHECK(e.find("holdout") != std::string::npos);
  write_text(s / "bad.txt", "train Z\n");
  e = error_of([&] { read_split_file(s / "bad.txt", {"A"}); });
  CHECK(e.find("'Z' is not in the dataset") != std::string::npos);
}

// =========================================================================== loader

namespace {
/// A set of n 4x4 RGB slices: pixel (y, x, c) = 16*i + 4*y + x + c (distinct per slice); slice i
/// has tumour iff i is odd (pixel (0, 0)).
slice_set toy_set(std::size_t n) {
  slice_set s;
  s.channels = 3;
  s.height = s.width = 4;
  s.patients = {"P"};
  s.mean = {{0, 0, 0}};
  s.stdev = {{1, 1, 1}};
  for (std::size_t i = 0; i < n; ++i) {
    slice_record r;
    r.number = static_cast<int>(i);
    r.positives = i % 2;
    s.records.push_back(r);
    for (std::size_t p = 0; p < 16; ++p)
      for (std::size_t c = 0; c < 3; ++c) s.images.push_back(static_cast<std::uint8_t>(16 * i + p + c));
    for (std::size_t p = 0; p < 16; ++p) s.masks.push_back(p == 0 && i % 2 ? 1 : 0);
  }
  return s;
}
}  // namespace

TEST_CASE("batch_loader: no augmentation gives x/255 in CHW, epochs cover the set, oversampling") {
  const slice_set set = toy_set(5);
  loader_options o;
  o.batch_size = 2;
  o.shuffle = false;
  batch_loader L(set, o);
  CHECK(L.batches_per_epoch() == 3);
  L.start(0);
  batch b;
  std::vector<std::size_t> seen;
  while (L.next(b)) {
    for (std::size_t k = 0; k < b.size(); ++k) {
      const std::size_t i = b.indices[k];
      seen.push_back(i);
      for (std::size_t c = 0; c < 3; ++c)
        for (std::size_t y = 0; y < 4; ++y)
          for (std::size_t x = 0; x < 4; ++x) CHECK(b.x(k, c, y, x) == static_cast<float>(16 * i + 4 * y + x + c) / 255.f);
      CHECK(b.y(k, 0, 0, 0) == static_cast<float>(i % 2));
    }
  }
  CHECK(seen == std::vector<std::size_t>{0, 1, 2, 3, 4});
  CHECK(b.size() == 1);  // last partial batch kept
  // oversampling: odd (tumour) slices three times
  o.oversample = 3;
  o.shuffle = true;
  batch_loader L3(set, o);
  const auto order = L3.epoch_order(4);
  CHECK(order.size() == 3 + 2 * 3);
  CHECK(std::count(order.begin(), order.end(), std::size_t{1}) == 3);
  CHECK(std::count(order.begin(), order.end(), std::size_t{2}) == 1);
  CHECK(L3.epoch_order(4) == order);  // deterministic
  CHECK(L3.epoch_order(5) != order);  // reshuffled per epoch
  o.drop_last = true;
  CHECK(batch_loader(set, o).batches_per_epoch() == 4);
}

TEST_CASE("augmentation: flips and a 90-degree rotation move pixels where expected; intensity") {
  const slice_set set = toy_set(2);
  std::vector<float> x(48), y(16), x0(48), y0(16);
  augment_slice(set.image(1), set.mask(1), 4, 4, 3, {}, x0.data(), y0.data());
  augment_params p;
  p.flip_h = true;
  augment_slice(set.image(1), set.mask(1), 4, 4, 3, p, x.data(), y.data());
  for (std::size_t c = 0; c < 3; ++c)
    for (std::size_t r = 0; r < 4; ++r)
      for (std::size_t q = 0; q < 4; ++q) CHECK(x[c * 16 + r * 4 + q] == x0[c * 16 + r * 4 + (3 - q)]);
  CHECK(y[3] == 1.f);  // the tumour pixel (0,0) moved to (0,3)
  p = {};
  p.flip_v = true;
  augment_slice(set.image(1), set.mask(1), 4, 4, 3, p, x.data(), y.data());
  CHECK(y[12] == 1.f);
  CHECK(x[12] == x0[0]);
  // rotation by 90 degrees about the center of a 4x4 image: a permutation of the pixels
  p = {};
  p.angle_deg = 90;
  augment_slice(set.image(1), set.mask(1), 4, 4, 3, p, x.data(), y.data());
  std::multiset<float> before(x0.begin(), x0.begin() + 16), after;
  for (std::size_t i = 0; i < 16; ++i) after.insert(static_cast<float>(std::round(x[i] * 255.f)) / 255.f);
  std::multiset<float> before_r;
  for (float v : before) before_r.insert(static_cast<float>(std::round(v * 255.f)) / 255.f);
  CHECK(after == before_r);
  float ysum = 0;
  for (float v : y) ysum += v;
  CHECK(ysum == 1.f);
  // intensity: contrast 2, brightness -0.1, clipped at 0
  p = {};
  p.contrast = 2;
  p.brightness = -0.1;
  augment_slice(set.image(0), set.mask(0), 4, 4, 3, p, x.data(), y.data());
  CHECK(x[0] == 0.f);  // 0/255*2 - 0.1 -> clipped
  CHECK(x[15] == doctest::Approx(15.0 / 255 * 2 - 0.1));
  // draw_augment respects the ranges and is off when disabled
  augment_options ao;
  useg::rng g(1);
  CHECK(draw_augment(ao, g).identity());
  ao.enabled = true;
  for (int i = 0; i < 200; ++i) {
    const augment_params q = draw_augment(ao, g);
    CHECK(std::abs(q.angle_deg) <= 15);
    CHECK(std::abs(q.scale - 1) <= 0.05);
    CHECK(std::abs(q.brightness) <= 0.1);
    CHECK(std::abs(q.contrast - 1) <= 0.1);
  }
}

TEST_CASE("batch_loader: background workers give the same batches as the calling thread; bounded prefetch") {
  const slice_set set = toy_set(37);
  loader_options o;
  o.batch_size = 4;
  o.seed = 11;
  o.oversample = 2;
  o.augment.enabled = true;
  o.workers = 0;
  batch_loader serial(set, o);
  o.workers = 3;
  o.prefetch = 2;
  batch_loader par(set, o);
  for (int epoch : {0, 3}) {
    serial.start(epoch);
    par.start(epoch);
    batch a, b;
    std::size_t n = 0;
    while (serial.next(a)) {
      REQUIRE(par.next(b));
      CHECK(a.indices == b.indices);
      CHECK(a.x == b.x);
      CHECK(a.y == b.y);
      ++n;
    }
    CHECK(!par.next(b));
    CHECK(n == serial.batches_per_epoch());
  }
  // nothing consumed: the workers stop after `prefetch` batches
  par.start(1);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  CHECK(par.queued() == 2);
  batch b;
  REQUIRE(par.next(b));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  CHECK(par.queued() == 2);
  par.stop();
}

TEST_CASE("batch_loader: per-volume standardization gives zero mean and unit variance over a volume") {
  slice_set set = toy_set(4);
  set.records.assign(set.records.begin(), set.records.end());
  // statistics as load_slices computes them
  for (std::size_t c = 0; c < 3; ++c) {
    double sum = 0, sq = 0;
    for (std::size_t i = 0; i < 4; ++i)
      for (std::size_t p = 0; p < 16; ++p) {
        const double v = set.image(i)[p * 3 + c];
        sum += v;
        sq += v * v;
      }
    const double m = sum / 64, sd = std::sqrt(sq / 64 - m * m);
    set.mean[0][c] = static_cast<float>(m);
    set.stdev[0][c] = static_cast<float>(sd);
  }
  loader_options o;
  o.batch_size = 4;
  o.shuffle = false;
  o.norm = normalization::volume;
  batch_loader L(set, o);
  L.start(0);
  batch b;
  REQUIRE(L.next(b));
  for (std::size_t c = 0; c < 3; ++c) {
    double sum = 0, sq = 0;
    for (std::size_t k = 0; k < 4; ++k)
      for (std::size_t p = 0; p < 16; ++p) {
        const double v = b.x(k, c, p / 4, p % 4);
        sum += v;
        sq += v * v;
      }
    CHECK(sum / 64 == doctest::Approx(0).epsilon(1e-4).scale(1));
    CHECK(sq / 64 == doctest::Approx(1).epsilon(1e-3));
  }
  CHECK(parse_normalization("volume") == normalization::volume);
  CHECK_THROWS_AS(parse_normalization("zscore"), useg::config_error);
}
