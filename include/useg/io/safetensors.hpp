// useg/io/safetensors.hpp — reading and writing the safetensors format.
//
//   bytes 0..7   N, the header length (unsigned 64-bit little-endian)
//   bytes 8..8+N a UTF-8 JSON object: {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]}, ...}
//                plus an optional "__metadata__": {"key": "value", ...} (strings only); padded with
//                spaces to a multiple of 8 bytes, as the reference implementation writes it
//   the rest     the tensors' raw little-endian bytes; data_offsets are relative to this section and
//                must tile it exactly (no gap, no overlap, nothing after the last tensor)
//
// Everything is checked on read, and every error is a useg::io_error naming the file and the problem.
// Writes are atomic: a temporary file in the same directory, fsync, then rename over the target.
// Needs nlohmann-json (CMake target useg::io); model headers never include this file.
#pragma once
#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "useg/core/error.hpp"

namespace useg::io {

/// Element types of the safetensors format (the reference's names).
enum class dtype { BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

inline const char* to_string(dtype t) {
  switch (t) {
    case dtype::BOOL: return "BOOL";
    case dtype::U8: return "U8";
    case dtype::I8: return "I8";
    case dtype::I16: return "I16";
    case dtype::U16: return "U16";
    case dtype::F16: return "F16";
    case dtype::BF16: return "BF16";
    case dtype::I32: return "I32";
    case dtype::U32: return "U32";
    case dtype::F32: return "F32";
    case dtype::F64: return "F64";
    case dtype::I64: return "I64";
    case dtype::U64: return "U64";
  }
  return "?";
}
/// Bytes per element.
inline std::size_t size_of(dtype t) {
  switch (t) {
    case dtype::BOOL:
    case dtype::U8:
    case dtype::I8: return 1;
    case dtype::I16:
    case dtype::U16:
    case dtype::F16:
    case dtype::BF16: return 2;
    case dtype::I32:
    case dtype::U32:
    case dtype::F32: return 4;
    case dtype::F64:
    case dtype::I64:
    case dtype::U64: return 8;
  }
  return 0;
}
inline bool is_floating(dtype t) { return t == dtype::F16 || t == dtype::BF16 || t == dtype::F32 || t == dtype::F64; }
inline bool is_integer(dtype t) { return !is_floating(t) && t != dtype::BOOL; }
/// The dtype named `s`, or nothing when the name is unknown.
inline std::optional<dtype> parse_dtype(std::string_view s) {
  for (dtype t : {dtype::BOOL, dtype::U8, dtype::I8, dtype::I16, dtype::U16, dtype::F16, dtype::BF16, dtype::I32, dtype::U32,
                  dtype::F32, dtype::F64, dtype::I64, dtype::U64})
    if (s == to_string(t)) return t;
  return std::nullopt;
}

/// "[2, 3]" for a file shape.
inline std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

namespace detail {
template <class T>
T load_le(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  if constexpr (std::endian::native == std::endian::big && sizeof(T) > 1) {
    auto* b = reinterpret_cast<unsigned char*>(&v);
    std::reverse(b, b + sizeof(T));
  }
  return v;
}
template <class T>
void store_le(unsigned char* p, T v) {
  std::memcpy(p, &v, sizeof(T));
  if constexpr (std::endian::native == std::endian::big && sizeof(T) > 1) std::reverse(p, p + sizeof(T));
}
inline float half_to_float(std::uint16_t h) {
  const int sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  double v;
  if (exp == 0) v = std::ldexp(static_cast<double>(mant), -24);  // zero / subnormal
  else if (exp == 31) v = mant ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else v = std::ldexp(static_cast<double>(mant | 0x400), exp - 25);
  return static_cast<float>(sign ? -v : v);
}
inline float bf16_to_float(std::uint16_t h) {
  const std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
template <class T>
constexpr dtype dtype_of() {
  if constexpr (std::is_same_v<T, float>) return dtype::F32;
  else if constexpr (std::is_same_v<T, double>) return dtype::F64;
  else if constexpr (std::is_same_v<T, std::int64_t>) return dtype::I64;
  else if constexpr (std::is_same_v<T, std::int32_t>) return dtype::I32;
  else if constexpr (std::is_same_v<T, std::uint8_t>) return dtype::U8;
  else static_assert(sizeof(T) == 0, "useg::io: element type must be float, double, int64_t, int32_t or uint8_t");
}
}  // namespace detail

/// One tensor of a safetensors file: dtype, shape ([] = a scalar) and raw little-endian bytes.
struct stored_tensor {
  dtype type = dtype::F32;
  std::vector<std::int64_t> shape;
  std::vector<unsigned char> bytes;

  std::size_t numel() const {
    std::size_t n = 1;
    for (auto d : shape) n *= static_cast<std::size_t>(d);
    return n;
  }
  /// Build from host values (float, double, int64_t, int32_t or uint8_t); values.size() == numel(shape).
  template <class T>
  static stored_tensor from_values(std::vector<std::int64_t> shape, const T* values, std::size_t n) {
    stored_tensor t;
    t.type = detail::dtype_of<T>();
    t.shape = std::move(shape);
    if (t.numel() != n)
      throw error("useg::io::stored_tensor: " + std::to_string(n) + " values for shape " + shape_str(t.shape));
    t.bytes.resize(n * sizeof(T));
    for (std::size_t i = 0; i < n; ++i) detail::store_le<T>(t.bytes.data() + i * sizeof(T), values[i]);
    return t;
  }
  /// The values of a floating-point tensor (F16, BF16, F32, F64) converted to T (float or double).
  /// `what` names the tensor in the error raised for another dtype.
  template <class T>
  std::vector<T> to_floating(const std::string& what = "tensor") const {
    static_assert(std::is_floating_point_v<T>);
    const std::size_t n = numel();
    std::vector<T> v(n);
    const unsigned char* p = bytes.data();
    switch (type) {
      case dtype::F32: for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<T>(detail::load_le<float>(p + 4 * i)); break;
      case dtype::F64: for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<T>(detail::load_le<double>(p + 8 * i)); break;
      case dtype::F16:
        for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<T>(detail::half_to_float(detail::load_le<std::uint16_t>(p + 2 * i)));
        break;
      case dtype::BF16:
        for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<T>(detail::bf16_to_float(detail::load_le<std::uint16_t>(p + 2 * i)));
        break;
      default: throw io_error("useg::io: " + what + " has dtype " + to_string(type) + ", a floating-point dtype was expected");
    }
    return v;
  }
  /// The values of an integer tensor (I8..I64, U8..U64) as int64 (U64 above INT64_MAX is an error).
  std::vector<std::int64_t> to_int64(const std::string& what = "tensor") const {
    const std::size_t n = numel(), sz = size_of(type);
    std::vector<std::int64_t> v(n);
    for (std::size_t i = 0; i < n; ++i) {
      const unsigned char* p = bytes.data() + i * sz;
      switch (type) {
        case dtype::I8: v[i] = detail::load_le<std::int8_t>(p); break;
        case dtype::U8: v[i] = detail::load_le<std::uint8_t>(p); break;
        case dtype::I16: v[i] = detail::load_le<std::int16_t>(p); break;
        case dtype::U16: v[i] = detail::load_le<std::uint16_t>(p); break;
        case dtype::I32: v[i] = detail::load_le<std::int32_t>(p); break;
        case dtype::U32: v[i] = detail::load_le<std::uint32_t>(p); break;
        case dtype::I64: v[i] = detail::load_le<std::int64_t>(p); break;
        case dtype::U64: {
          const auto u = detail::load_le<std::uint64_t>(p);
          if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
            throw io_error("useg::io: " + what + " holds a U64 value too large for int64");
          v[i] = static_cast<std::int64_t>(u);
          break;
        }
        default: throw io_error("useg::io: " + what + " has dtype " + to_string(type) + ", an integer dtype was expected");
      }
    }
    return v;
  }
};

/// The contents of a safetensors file: named tensors (in insertion order, which is also the order
/// of their data when written) and the "__metadata__" string map.
class safetensors {
 public:
  std::map<std::string, std::string> metadata;

  /// Add a tensor; names must be unique, non-empty and not "__metadata__".
  void add(std::string name, stored_tensor t) {
    if (name.empty() || name == "__metadata__")
      throw error("useg::io::safetensors: invalid tensor name '" + name + "'");
    if (index_.count(name)) throw error("useg::io::safetensors: duplicate tensor name '" + name + "'");
    if (t.bytes.size() != t.numel() * size_of(t.type))
      throw error("useg::io::safetensors: tensor '" + name + "' has " + std::to_string(t.bytes.size()) + " bytes, its dtype " +
                  to_string(t.type) + " and shape " + shape_str(t.shape) + " need " + std::to_string(t.numel() * size_of(t.type)));
    index_.emplace(name, tensors_.size());
    tensors_.emplace_back(std::move(name), std::move(t));
  }
  template <class T>
  void add(std::string name, std::vector<std::int64_t> shape, const std::vector<T>& values) {
    add(std::move(name), stored_tensor::from_values<T>(std::move(shape), values.data(), values.size()));
  }
  /// The tensor called `name`, or nullptr.
  const stored_tensor* find(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second].second;
  }
  /// The tensor called `name`; io_error (naming `source`) when absent.
  const stored_tensor& at(const std::string& name, const std::string& source = "safetensors") const {
    const stored_tensor* t = find(name);
    if (!t) throw io_error("useg::io: '" + source + "' has no tensor '" + name + "'");
    return *t;
  }
  const std::vector<std::pair<std::string, stored_tensor>>& tensors() const { return tensors_; }
  std::size_t size() const { return tensors_.size(); }

 private:
  std::vector<std::pair<std::string, stored_tensor>> tensors_;
  std::map<std::string, std::size_t> index_;
};

// ==================================================================================== reading
/// The largest header accepted (the reference implementation's limit).
inline constexpr std::uint64_t max_header_bytes = 100'000'000;

/// A parsed, validated header: tensor infos sorted by data offset, and the metadata.
struct safetensors_header {
  struct info {
    std::string name;
    dtype type;
    std::vector<std::int64_t> shape;
    std::uint64_t begin, end;  ///< byte offsets into the data section
  };
  std::vector<info> tensors;
  std::map<std::string, std::string> metadata;
  std::uint64_t header_bytes = 0;  ///< N
  std::uint64_t data_bytes = 0;    ///< size of the data section
};

namespace detail {
[[noreturn]] inline void fail(const std::string& source, const std::string& problem) {
  throw io_error("useg::io: '" + source + "' is not a valid safetensors file: " + problem);
}

/// Parse and validate the header text `text` (the N header bytes) of a file whose data section
/// holds `data_bytes` bytes.
inline safetensors_header parse_header(const std::string& text, std::uint64_t data_bytes, const std::string& source) {
  using nlohmann::json;
  // Reject duplicate keys (nlohmann would silently keep the last one).
  std::vector<std::vector<std::string>> keys_at_depth;
  std::string duplicate;
  json::parser_callback_t cb = [&](int depth, json::parse_event_t ev, json& parsed) {
    const auto d = static_cast<std::size_t>(depth);
    if (ev == json::parse_event_t::object_start) {
      if (keys_at_depth.size() <= d + 1) keys_at_depth.resize(d + 2);
      keys_at_depth[d + 1].clear();
    } else if (ev == json::parse_event_t::key) {
      if (keys_at_depth.size() <= d) keys_at_depth.resize(d + 1);
      auto& ks = keys_at_depth[d];
      const std::string k = parsed.get<std::string>();
      if (std::find(ks.begin(), ks.end(), k) != ks.end() && duplicate.empty()) duplicate = k;
      ks.push_back(k);
    }
    return true;
  };
  json h;
  try {
    h = json::parse(text, cb);
  } catch (const json::exception& e) {
    fail(source, std::string("the header is not valid JSON (") + e.what() + ")");
  }
  if (!duplicate.empty()) fail(source, "the header has the key \"" + duplicate + "\" twice");
  if (!h.is_object()) fail(source, "the header is JSON but not an object");

  safetensors_header out;
  out.data_bytes = data_bytes;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (v.is_null()) continue;  // the reference implementation accepts null for "no metadata"
      if (!v.is_object()) fail(source, "\"__metadata__\" is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) fail(source, "\"__metadata__\" value of \"" + m.key() + "\" is not a string");
        out.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (name.empty()) fail(source, "a tensor has an empty name");
    const std::string who = "tensor '" + name + "': ";
    if (!v.is_object()) fail(source, who + "its entry is not an object");
    for (const char* k : {"dtype", "shape", "data_offsets"})
      if (!v.contains(k)) fail(source, who + "no \"" + k + "\"");
    if (!v["dtype"].is_string()) fail(source, who + "\"dtype\" is not a string");
    const auto t = parse_dtype(v["dtype"].get<std::string>());
    if (!t) fail(source, who + "unknown dtype \"" + v["dtype"].get<std::string>() + "\"");
    safetensors_header::info in{name, *t, {}, 0, 0};
    if (!v["shape"].is_array()) fail(source, who + "\"shape\" is not an array");
    std::uint64_t numel = 1;
    bool overflow = false;
    for (const json& d : v["shape"]) {
      if (!d.is_number_integer() || (d.is_number_integer() && !d.is_number_unsigned() && d.get<std::int64_t>() < 0))
        fail(source, who + "\"shape\" holds " + d.dump() + ", not a non-negative integer");
      const std::uint64_t u = d.get<std::uint64_t>();
      if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) fail(source, who + "dimension too large");
      in.shape.push_back(static_cast<std::int64_t>(u));
      if (u != 0 && numel > std::numeric_limits<std::uint64_t>::max() / u) overflow = true;
      numel *= u;
    }
    if (overflow || numel > std::numeric_limits<std::uint64_t>::max() / size_of(*t))
      fail(source, who + "shape " + shape_str(in.shape) + " is too large");
    const json& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail(source, who + "\"data_offsets\" is " + off.dump() + ", not two non-negative integers");
    in.begin = off[0].get<std::uint64_t>();
    in.end = off[1].get<std::uint64_t>();
    if (in.end < in.begin) fail(source, who + "data_offsets " + off.dump() + " end before they begin");
    const std::uint64_t need = numel * size_of(*t);
    if (in.end - in.begin != need)
      fail(source, who + "data_offsets " + off.dump() + " span " + std::to_string(in.end - in.begin) + " bytes, but dtype " +
                       to_string(*t) + " with shape " + shape_str(in.shape) + " needs " + std::to_string(need));
    if (in.end > data_bytes)
      fail(source, who + "data_offsets " + off.dump() + " reach beyond the data section of " + std::to_string(data_bytes) +
                       " bytes (file truncated?)");
    out.tensors.push_back(std::move(in));
  }
  std::sort(out.tensors.begin(), out.tensors.end(),
            [](const auto& a, const auto& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  std::uint64_t pos = 0;
  for (std::size_t i = 0; i < out.tensors.size(); ++i) {
    const auto& in = out.tensors[i];
    if (in.begin < pos)
      fail(source, "tensor '" + in.name + "' (bytes " + std::to_string(in.begin) + ".." + std::to_string(in.end) +
                       ") overlaps tensor '" + out.tensors[i - 1].name + "'");
    if (in.begin > pos)
      fail(source, "a gap of " + std::to_string(in.begin - pos) + " unused bytes before tensor '" + in.name + "' (offset " +
                       std::to_string(pos) + ")");
    pos = in.end;
  }
  if (pos != data_bytes)
    fail(source, std::to_string(data_bytes - pos) + " bytes after the last tensor's data are not described by the header");
  return out;
}

struct file_closer {
  int fd = -1;
  ~file_closer() {
    if (fd >= 0) ::close(fd);
  }
};

inline std::string errno_text(int e) { return std::strerror(e); }

/// Read exactly n bytes at offset `at`; false on a short read.
inline bool pread_all(int fd, void* dst, std::size_t n, std::uint64_t at) {
  auto* p = static_cast<unsigned char*>(dst);
  while (n > 0) {
    const ssize_t r = ::pread(fd, p, n, static_cast<off_t>(at));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<std::size_t>(r);
    at += static_cast<std::uint64_t>(r);
  }
  return true;
}

/// Open `path`, read and validate its header. fd stays open in `f` for reading the data.
inline safetensors_header open_and_parse(const std::string& path, file_closer& f) {
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) throw io_error("useg::io: cannot open '" + path + "': " + errno_text(errno));
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) throw io_error("useg::io: cannot stat '" + path + "': " + errno_text(errno));
  if (!S_ISREG(st.st_mode)) throw io_error("useg::io: '" + path + "' is not a regular file");
  const auto size = static_cast<std::uint64_t>(st.st_size);
  if (size < 8)
    fail(path, "truncated: the file has " + std::to_string(size) + " bytes, fewer than the 8-byte header length");
  unsigned char len[8];
  if (!pread_all(f.fd, len, 8, 0)) throw io_error("useg::io: cannot read '" + path + "': " + errno_text(errno));
  const auto n = load_le<std::uint64_t>(len);
  if (n > max_header_bytes)
    fail(path, "the header length " + std::to_string(n) + " exceeds the limit of " + std::to_string(max_header_bytes) +
                   " bytes (file size " + std::to_string(size) + ")");
  if (n > size - 8)
    fail(path, "the header length " + std::to_string(n) + " goes beyond the end of the file (" + std::to_string(size) +
                   " bytes; truncated?)");
  std::string text(static_cast<std::size_t>(n), '\0');
  if (n && !pread_all(f.fd, text.data(), text.size(), 8))
    throw io_error("useg::io: cannot read '" + path + "': " + errno_text(errno));
  auto h = parse_header(text, size - 8 - n, path);
  h.header_bytes = n;
  return h;
}
}  // namespace detail

/// Parse a whole file held in memory; `source` names it in error messages.
inline safetensors parse_safetensors(std::string_view bytes, const std::string& source = "<memory>") {
  if (bytes.size() < 8)
    detail::fail(source, "truncated: " + std::to_string(bytes.size()) + " bytes, fewer than the 8-byte header length");
  const auto n = detail::load_le<std::uint64_t>(reinterpret_cast<const unsigned char*>(bytes.data()));
  if (n > max_header_bytes) detail::fail(source, "the header length " + std::to_string(n) + " exceeds the limit");
  if (n > bytes.size() - 8)
    detail::fail(source, "the header length " + std::to_string(n) + " goes beyond the end of the data (" +
                             std::to_string(bytes.size()) + " bytes; truncated?)");
  const auto h = detail::parse_header(std::string(bytes.substr(8, n)), bytes.size() - 8 - n, source);
  safetensors out;
  out.metadata = h.metadata;
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data()) + 8 + n;
  for (const auto& in : h.tensors) {
    stored_tensor t{in.type, in.shape, std::vector<unsigned char>(data + in.begin, data + in.end)};
    out.add(in.name, std::move(t));
  }
  return out;
}

/// Read and validate a safetensors file. Tensors come in data order.
inline safetensors read_safetensors(const std::string& path) {
  detail::file_closer f;
  const auto h = detail::open_and_parse(path, f);
  safetensors out;
  out.metadata = h.metadata;
  const std::uint64_t base = 8 + h.header_bytes;
  for (const auto& in : h.tensors) {
    stored_tensor t{in.type, in.shape, {}};
    t.bytes.resize(static_cast<std::size_t>(in.end - in.begin));
    if (!t.bytes.empty() && !detail::pread_all(f.fd, t.bytes.data(), t.bytes.size(), base + in.begin))
      throw io_error("useg::io: cannot read tensor '" + in.name + "' from '" + path + "' (file changed while reading?)");
    out.add(in.name, std::move(t));
  }
  return out;
}

/// The validated header of a file (names, dtypes, shapes, offsets, metadata) without reading the data.
inline safetensors_header read_safetensors_header(const std::string& path) {
  detail::file_closer f;
  return detail::open_and_parse(path, f);
}

// ==================================================================================== writing
/// The header text of `st`, padded with spaces to a multiple of 8 bytes. Tensors are laid out in
/// insertion order, "__metadata__" (when non-empty) comes first.
inline std::string header_text(const safetensors& st) {
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  if (!st.metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : st.metadata) m[k] = v;
    h["__metadata__"] = std::move(m);
  }
  std::uint64_t off = 0;
  for (const auto& [name, t] : st.tensors()) {
    nlohmann::ordered_json e = nlohmann::ordered_json::object();
    e["dtype"] = to_string(t.type);
    e["shape"] = t.shape;
    e["data_offsets"] = {off, off + t.bytes.size()};
    off += t.bytes.size();
    h[name] = std::move(e);
  }
  std::string s;
  try {
    s = h.dump();
  } catch (const nlohmann::json::exception& e) {  // e.g. invalid UTF-8 in a name or metadata value
    throw io_error(std::string("useg::io: cannot encode the safetensors header: ") + e.what());
  }
  s.append((8 - s.size() % 8) % 8, ' ');
  return s;
}

/// A file written atomically: data goes to a temporary file next to `path`; commit() flushes it to
/// disk and renames it over `path`. Destroyed without commit() (an error), it removes the
/// temporary file and `path` keeps its old contents.
class atomic_file {
 public:
  explicit atomic_file(std::string path) : path_(std::move(path)) {
    static std::atomic<unsigned> counter{0};
    for (int attempt = 0; attempt < 100; ++attempt) {
      tmp_ = path_ + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
      fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd_ >= 0) return;
      if (errno != EEXIST) break;
    }
    throw io_error("useg::io: cannot write '" + path_ + "': cannot create a temporary file next to it (" +
                   detail::errno_text(errno) + ")");
  }
  atomic_file(const atomic_file&) = delete;
  atomic_file& operator=(const atomic_file&) = delete;
  ~atomic_file() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }
  void write(const void* data, std::size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    while (n > 0) {
      const ssize_t r = ::write(fd_, p, std::min<std::size_t>(n, std::size_t{1} << 30));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) fail_write(r < 0 ? errno : ENOSPC);
      p += r;
      n -= static_cast<std::size_t>(r);
    }
  }
  void commit() {
    if (::fsync(fd_) != 0) fail_write(errno);
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) fail_write(errno);
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) fail_write(errno);
    committed_ = true;
    // Make the rename itself durable; failure here (unsupported by the file system) is not fatal.
    const auto slash = path_.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path_.substr(0, slash);
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      (void)::fsync(dfd);
      ::close(dfd);
    }
  }
  const std::string& temporary_path() const { return tmp_; }

 private:
  [[noreturn]] void fail_write(int e) {
    throw io_error("useg::io: cannot write '" + path_ + "': " + detail::errno_text(e) + "; the existing file (if any) is unchanged");
  }
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

/// Write `st` to `path` atomically (the old file stays intact when anything fails).
inline void write_safetensors(const std::string& path, const safetensors& st) {
  const std::string h = header_text(st);
  unsigned char len[8];
  detail::store_le<std::uint64_t>(len, h.size());
  atomic_file f(path);
  f.write(len, 8);
  f.write(h.data(), h.size());
  for (const auto& [name, t] : st.tensors())
    if (!t.bytes.empty()) f.write(t.bytes.data(), t.bytes.size());
  f.commit();
}

/// The whole file as bytes (for tests and in-memory use).
inline std::string serialize_safetensors(const safetensors& st) {
  const std::string h = header_text(st);
  std::string out(8, '\0');
  detail::store_le<std::uint64_t>(reinterpret_cast<unsigned char*>(out.data()), h.size());
  out += h;
  for (const auto& [name, t] : st.tensors()) out.append(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
  return out;
}

}  // namespace useg::io
