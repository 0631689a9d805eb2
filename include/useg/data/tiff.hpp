// useg/data/tiff.hpp — reading and writing TIFF images with libtiff.
//
//   read_tiff_u8(path):  any TIFF libtiff can decode (uncompressed or compressed, strips or
//                        tiles, contiguous or planar, gray / RGB / palette, 8 or 16 bits) as an
//                        8-bit (height, width, channels) array: 1 channel for gray images, 3 for
//                        everything else (alpha dropped). The first image of the file.
//   read_tiff_f32(path): 32-bit float TIFFs (e.g. the probability maps lgg_predict writes).
//   write_tiff(path, a): 8-bit gray/RGB or float32 images, optionally compressed; written to a
//                        temporary file and renamed, so a reader never sees a half-written file.
// Errors are useg::io_error with the file name and libtiff's own message.
#pragma once
#include <tiffio.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <type_traits>
#include <vector>

#include <xtensor/xtensor.hpp>

#include "useg/core/error.hpp"

namespace useg::data {

/// An 8-bit image, shape (height, width, channels).
using image_u8 = xt::xtensor<std::uint8_t, 3>;
/// A float image, shape (height, width, channels).
using image_f32 = xt::xtensor<float, 3>;

/// Compression for write_tiff.
enum class tiff_compression { none, deflate, lzw, packbits };

/// What a TIFF holds (first image).
struct tiff_info {
  int width = 0, height = 0;
  int samples = 0;        ///< samples per pixel
  int bits = 0;           ///< bits per sample
  int sample_format = 1;  ///< 1 uint, 2 int, 3 float
  int photometric = 0;    ///< PHOTOMETRIC_*
  int compression = 1;    ///< COMPRESSION_*
  bool tiled = false;
};

namespace detail {

/// Collects libtiff's error messages for one open file.
struct tiff_messages {
  std::string errors;
};

inline int tiff_error_handler(TIFF*, void* user, const char* module, const char* fmt, va_list ap) {
  char buf[512];
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  auto* m = static_cast<tiff_messages*>(user);
  if (m) {
    if (!m->errors.empty()) m->errors += "; ";
    if (module && *module) m->errors += std::string(module) + ": ";
    m->errors += buf;
  }
  return 1;  // handled: libtiff does not print it
}
inline int tiff_warning_handler(TIFF*, void*, const char*, const char*, va_list) { return 1; }

#if TIFFLIB_VERSION < 20221213
// libtiff < 4.5 has no per-file handlers: collect into a thread-local buffer instead.
inline thread_local tiff_messages* tls_tiff_messages = nullptr;
inline void tiff_global_error(const char* module, const char* fmt, va_list ap) {
  tiff_error_handler(nullptr, tls_tiff_messages, module, fmt, ap);
}
inline void tiff_global_warning(const char*, const char*, va_list) {}
#endif

/// An open TIFF with its message collector; closes on destruction.
class tiff_file {
 public:
  tiff_file(const std::string& path, const char* mode) : path_(path) {
#if TIFFLIB_VERSION >= 20221213
    TIFFOpenOptions* opts = TIFFOpenOptionsAlloc();
    TIFFOpenOptionsSetErrorHandlerExtR(opts, &tiff_error_handler, &msg_);
    TIFFOpenOptionsSetWarningHandlerExtR(opts, &tiff_warning_handler, nullptr);
    tif_ = TIFFOpenExt(path.c_str(), mode, opts);
    TIFFOpenOptionsFree(opts);
#else
    static const bool installed = [] {
      TIFFSetErrorHandler(&tiff_global_error);
      TIFFSetWarningHandler(&tiff_global_warning);
      return true;
    }();
    (void)installed;
    tls_tiff_messages = &msg_;
    tif_ = TIFFOpen(path.c_str(), mode);
#endif
    if (!tif_) fail(std::string(mode[0] == 'r' ? "cannot open" : "cannot create") + " TIFF");
  }
  tiff_file(const tiff_file&) = delete;
  tiff_file& operator=(const tiff_file&) = delete;
  ~tiff_file() { close(); }
  void close() {
    if (tif_) TIFFClose(tif_);
    tif_ = nullptr;
  }
  TIFF* get() const {
#if TIFFLIB_VERSION < 20221213
    tls_tiff_messages = const_cast<tiff_messages*>(&msg_);
#endif
    return tif_;
  }
  [[noreturn]] void fail(const std::string& what) const {
    std::string m = "'" + path_ + "': " + what;
    if (!msg_.errors.empty()) m += " (libtiff: " + msg_.errors + ")";
    throw io_error(m);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  tiff_messages msg_;
  TIFF* tif_ = nullptr;
};

inline void require_regular_file(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) throw io_error("'" + path + "': file not found");
  if (!std::filesystem::is_regular_file(path, ec)) throw io_error("'" + path + "': not a regular file");
  if (std::filesystem::file_size(path, ec) == 0) throw io_error("'" + path + "': empty file (0 bytes)");
}

inline tiff_info info_of(const tiff_file& f) {
  TIFF* t = f.get();
  tiff_info i;
  std::uint32_t w = 0, h = 0;
  std::uint16_t spp = 1, bps = 1, fmt = 1, photo = 0, comp = 1;
  if (!TIFFGetField(t, TIFFTAG_IMAGEWIDTH, &w) || !TIFFGetField(t, TIFFTAG_IMAGELENGTH, &h))
    f.fail("missing image width/height tags");
  TIFFGetFieldDefaulted(t, TIFFTAG_SAMPLESPERPIXEL, &spp);
  TIFFGetFieldDefaulted(t, TIFFTAG_BITSPERSAMPLE, &bps);
  TIFFGetFieldDefaulted(t, TIFFTAG_SAMPLEFORMAT, &fmt);
  TIFFGetFieldDefaulted(t, TIFFTAG_COMPRESSION, &comp);
  if (!TIFFGetField(t, TIFFTAG_PHOTOMETRIC, &photo)) photo = spp >= 3 ? PHOTOMETRIC_RGB : PHOTOMETRIC_MINISBLACK;
  if (w == 0 || h == 0) f.fail("zero width or height");
  if (w > (1u << 16) || h > (1u << 16)) f.fail("image too large (" + std::to_string(w) + "x" + std::to_string(h) + ")");
  i.width = static_cast<int>(w);
  i.height = static_cast<int>(h);
  i.samples = spp;
  i.bits = bps;
  i.sample_format = fmt;
  i.photometric = photo;
  i.compression = comp;
  i.tiled = TIFFIsTiled(t) != 0;
  return i;
}

}  // namespace detail

/// The header of a TIFF's first image.
inline tiff_info read_tiff_info(const std::string& path) {
  detail::require_regular_file(path);
  detail::tiff_file f(path, "r");
  return detail::info_of(f);
}

/// Read a TIFF as 8-bit (height, width, channels): 1 channel for gray (min-is-black or
/// min-is-white, one color sample), 3 for everything else. Throws io_error on anything
/// unreadable (missing, truncated, corrupt, unsupported), naming the file.
inline image_u8 read_tiff_u8(const std::string& path) {
  detail::require_regular_file(path);
  detail::tiff_file f(path, "r");
  const tiff_info info = detail::info_of(f);
  if (info.sample_format == SAMPLEFORMAT_IEEEFP)
    f.fail("floating-point samples; an 8-bit gray or RGB image was expected");
  char emsg[1024] = {0};
  if (!TIFFRGBAImageOK(f.get(), emsg)) f.fail(std::string("unsupported TIFF layout: ") + emsg);
  const bool gray = (info.photometric == PHOTOMETRIC_MINISBLACK || info.photometric == PHOTOMETRIC_MINISWHITE) &&
                    (info.samples == 1 || info.samples == 2);
  const std::size_t W = static_cast<std::size_t>(info.width), H = static_cast<std::size_t>(info.height);
  std::vector<std::uint32_t> raster(W * H);
  if (!TIFFReadRGBAImageOriented(f.get(), static_cast<std::uint32_t>(W), static_cast<std::uint32_t>(H), raster.data(),
                                 ORIENTATION_TOPLEFT, 1))
    f.fail("cannot decode the image data (truncated or corrupt file?)");
  const std::size_t C = gray ? 1 : 3;
  image_u8 out = image_u8::from_shape({H, W, C});
  std::uint8_t* o = out.data();
  for (std::size_t p = 0; p < W * H; ++p) {
    const std::uint32_t v = raster[p];
    if (gray) {
      o[p] = static_cast<std::uint8_t>(TIFFGetR(v));
    } else {
      o[3 * p] = static_cast<std::uint8_t>(TIFFGetR(v));
      o[3 * p + 1] = static_cast<std::uint8_t>(TIFFGetG(v));
      o[3 * p + 2] = static_cast<std::uint8_t>(TIFFGetB(v));
    }
  }
  return out;
}

/// Read a 32-bit float TIFF (contiguous samples, strips or tiles, any compression) as
/// (height, width, samples).
inline image_f32 read_tiff_f32(const std::string& path) {
  detail::require_regular_file(path);
  detail::tiff_file f(path, "r");
  const tiff_info info = detail::info_of(f);
  if (info.sample_format != SAMPLEFORMAT_IEEEFP || info.bits != 32)
    f.fail("expected 32-bit floating-point samples, got " + std::to_string(info.bits) + "-bit sample format " +
           std::to_string(info.sample_format));
  std::uint16_t planar = PLANARCONFIG_CONTIG;
  TIFFGetFieldDefaulted(f.get(), TIFFTAG_PLANARCONFIG, &planar);
  if (planar != PLANARCONFIG_CONTIG && info.samples > 1) f.fail("planar (separate) float images are not supported");
  const std::size_t W = static_cast<std::size_t>(info.width), H = static_cast<std::size_t>(info.height),
                    C = static_cast<std::size_t>(info.samples);
  image_f32 out = image_f32::from_shape({H, W, C});
  TIFF* t = f.get();
  if (!info.tiled) {
    std::uint32_t rps = 0;
    TIFFGetFieldDefaulted(t, TIFFTAG_ROWSPERSTRIP, &rps);
    if (rps == 0 || rps > H) rps = static_cast<std::uint32_t>(H);
    std::vector<float> buf(static_cast<std::size_t>(rps) * W * C);
    for (std::size_t row = 0, s = 0; row < H; row += rps, ++s) {
      const std::size_t rows = std::min<std::size_t>(rps, H - row);
      const tmsize_t want = static_cast<tmsize_t>(rows * W * C * sizeof(float));
      if (TIFFReadEncodedStrip(t, static_cast<std::uint32_t>(s), buf.data(), want) < want)
        f.fail("cannot read strip " + std::to_string(s) + " (truncated or corrupt file?)");
      std::memcpy(out.data() + row * W * C, buf.data(), static_cast<std::size_t>(want));
    }
  } else {
    std::uint32_t tw = 0, th = 0;
    TIFFGetField(t, TIFFTAG_TILEWIDTH, &tw);
    TIFFGetField(t, TIFFTAG_TILELENGTH, &th);
    if (tw == 0 || th == 0) f.fail("tiled image without tile size");
    std::vector<float> buf(static_cast<std::size_t>(tw) * th * C);
    for (std::size_t y = 0; y < H; y += th)
      for (std::size_t x = 0; x < W; x += tw) {
        const ttile_t tile = TIFFComputeTile(t, static_cast<std::uint32_t>(x), static_cast<std::uint32_t>(y), 0, 0);
        const tmsize_t want = static_cast<tmsize_t>(buf.size() * sizeof(float));
        if (TIFFReadEncodedTile(t, tile, buf.data(), want) < want)
          f.fail("cannot read tile " + std::to_string(tile) + " (truncated or corrupt file?)");
        for (std::size_t r = 0; r < th && y + r < H; ++r)
          for (std::size_t c = 0; c < tw && x + c < W; ++c)
            for (std::size_t k = 0; k < C; ++k) out((y + r), (x + c), k) = buf[(r * tw + c) * C + k];
      }
  }
  return out;
}

namespace detail {
template <class T>
void write_tiff_impl(const std::string& path, const T* data, std::size_t H, std::size_t W, std::size_t C,
                     tiff_compression comp) {
  constexpr bool is_float = std::is_same_v<T, float>;
  if (H == 0 || W == 0 || C == 0) throw io_error("'" + path + "': cannot write an empty image");
  if (!is_float && C != 1 && C != 3)
    throw io_error("'" + path + "': 8-bit images must have 1 (gray) or 3 (RGB) channels, got " + std::to_string(C));
  const std::filesystem::path final_path(path);
  if (final_path.has_parent_path()) {
    std::error_code ec;
    std::filesystem::create_directories(final_path.parent_path(), ec);
  }
  const std::string tmp = path + ".tmp";
  {
    tiff_file f(tmp, "w");
    TIFF* t = f.get();
    TIFFSetField(t, TIFFTAG_IMAGEWIDTH, static_cast<std::uint32_t>(W));
    TIFFSetField(t, TIFFTAG_IMAGELENGTH, static_cast<std::uint32_t>(H));
    TIFFSetField(t, TIFFTAG_SAMPLESPERPIXEL, static_cast<std::uint16_t>(C));
    TIFFSetField(t, TIFFTAG_BITSPERSAMPLE, static_cast<std::uint16_t>(8 * sizeof(T)));
    TIFFSetField(t, TIFFTAG_SAMPLEFORMAT, static_cast<std::uint16_t>(is_float ? SAMPLEFORMAT_IEEEFP : SAMPLEFORMAT_UINT));
    TIFFSetField(t, TIFFTAG_PHOTOMETRIC, static_cast<std::uint16_t>(C == 3 && !is_float ? PHOTOMETRIC_RGB : PHOTOMETRIC_MINISBLACK));
    TIFFSetField(t, TIFFTAG_PLANARCONFIG, static_cast<std::uint16_t>(PLANARCONFIG_CONTIG));
    TIFFSetField(t, TIFFTAG_ORIENTATION, static_cast<std::uint16_t>(ORIENTATION_TOPLEFT));
    std::uint16_t c = COMPRESSION_NONE;
    switch (comp) {
      case tiff_compression::none: c = COMPRESSION_NONE; break;
      case tiff_compression::deflate: c = COMPRESSION_ADOBE_DEFLATE; break;
      case tiff_compression::lzw: c = COMPRESSION_LZW; break;
      case tiff_compression::packbits: c = COMPRESSION_PACKBITS; break;
    }
    if (!TIFFSetField(t, TIFFTAG_COMPRESSION, c)) f.fail("compression not supported by this libtiff");
    if (c == COMPRESSION_ADOBE_DEFLATE || c == COMPRESSION_LZW)
      TIFFSetField(t, TIFFTAG_PREDICTOR, static_cast<std::uint16_t>(is_float ? PREDICTOR_FLOATINGPOINT : PREDICTOR_HORIZONTAL));
    TIFFSetField(t, TIFFTAG_ROWSPERSTRIP, TIFFDefaultStripSize(t, 0));
    std::vector<T> row(W * C);
    for (std::size_t y = 0; y < H; ++y) {
      std::memcpy(row.data(), data + y * W * C, W * C * sizeof(T));  // libtiff may modify the buffer
      if (TIFFWriteScanline(t, row.data(), static_cast<std::uint32_t>(y), 0) < 0) f.fail("cannot write row " + std::to_string(y));
    }
    if (!TIFFWriteDirectory(t)) f.fail("cannot write the directory");
    f.close();
  }
  std::error_code ec;
  std::filesystem::rename(tmp, final_path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    throw io_error("'" + path + "': cannot rename the temporary file into place");
  }
}
}  // namespace detail

/// Write an 8-bit gray (1 channel) or RGB (3 channels) image, shape (height, width, channels).
inline void write_tiff(const std::string& path, const image_u8& img, tiff_compression comp = tiff_compression::deflate) {
  detail::write_tiff_impl(path, img.data(), img.shape()[0], img.shape()[1], img.shape()[2], comp);
}
/// Write a 32-bit float image, shape (height, width, channels).
inline void write_tiff(const std::string& path, const image_f32& img, tiff_compression comp = tiff_compression::deflate) {
  detail::write_tiff_impl(path, img.data(), img.shape()[0], img.shape()[1], img.shape()[2], comp);
}

}  // namespace useg::data
