// Weights I/O: the safetensors format byte by byte, corrupt files, round trips of all four models,
// wrong-model loads, atomic writes and the training state.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>

#include <sys/resource.h>
#include <unistd.h>

#include "useg/io/checkpoint.hpp"
#include "useg/useg.hpp"

using namespace useg;
namespace fs = std::filesystem;

#define USEG_ALL_MODELS(Backend, In, Cls)                                                               \
  useg::unet<Backend, In, Cls>, useg::attention_unet<Backend, In, Cls>, useg::r2unet<Backend, In, Cls>, \
      useg::ar2unet<Backend, In, Cls>

namespace {

/// A fresh directory, removed at the end of the test.
struct temp_dir {
  fs::path path;
  explicit temp_dir(const std::string& tag) {
    path = fs::temp_directory_path() / ("useg_test_io_" + tag + "_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}
void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}
std::string le64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}
/// A file: 8-byte length, the header (padded with spaces to 8 when `pad`), then `data`.
std::string make_file(std::string header, const std::string& data, bool pad = true) {
  if (pad) header.append((8 - header.size() % 8) % 8, ' ');
  return le64(header.size()) + header + data;
}
std::string f32_bytes(std::initializer_list<float> v) {
  std::string s;
  for (float x : v) s.append(reinterpret_cast<const char*>(&x), 4);  // the test machine is little-endian
  return s;
}

/// `f` must throw an io_error whose message names `path` and contains every phrase.
void expect_io_error(const std::function<void()>& f, const std::string& path, std::initializer_list<std::string> phrases) {
  try {
    f();
    FAIL("no io_error was thrown (expected one mentioning '" << *phrases.begin() << "')");
  } catch (const io_error& e) {
    const std::string msg = e.what();
    INFO("message: " << msg);
    CHECK(msg.find(path) != std::string::npos);
    for (const auto& p : phrases) {
      INFO("phrase: " << p);
      CHECK(msg.find(p) != std::string::npos);
    }
  }
}

template <class B>
struct snapshot {
  std::vector<typename B::scalar> params, buffers;
  std::vector<std::int64_t> counters;
  explicit snapshot(param_store<B>& s)
      : params(s.flat_params().to_host()), buffers(s.flat_buffers().to_host()), counters(s.counters()) {}
  bool operator==(const snapshot& o) const { return params == o.params && buffers == o.buffers && counters == o.counters; }
};

unet_config small_config(std::uint64_t seed, int width = 4, int depth = 2) {
  unet_config c;
  c.width = width;
  c.depth = depth;
  c.t = 2;
  c.seed = seed;
  return c;
}

template <class B>
tensor<B> random_input(shape s, std::uint64_t seed, double lo = -1, double hi = 1) {
  useg::rng g(seed);
  std::vector<typename B::scalar> v(s.numel());
  for (auto& x : v) x = static_cast<typename B::scalar>(g.uniform(lo, hi));
  return tensor<B>::from_host(s, v);
}
template <class B>
tensor<B> random_mask(shape s, std::uint64_t seed) {
  useg::rng g(seed);
  std::vector<typename B::scalar> v(s.numel());
  for (auto& x : v) x = g.uniform() < 0.3 ? 1 : 0;
  return tensor<B>::from_host(s, v);
}

/// One training step: train forward, BCE, backward, optimizer step.
template <class Model>
void train_step(Model& m, optimizer<typename Model::backend>& opt, const tensor<typename Model::backend>& x,
                const tensor<typename Model::backend>& y) {
  tensor<typename Model::backend> g;
  m.train();
  m.zero_grad();
  bce_with_logits_loss(m.ctx(), m.forward(x), y, &g);
  m.backward(g);
  opt.step();
}

}  // namespace

// ============================================================================== format, byte level
TEST_CASE("safetensors writer: exact bytes of a small file (length, header JSON, space padding, data)") {
  io::safetensors st;
  st.metadata["k"] = "v";
  st.add("a", {2}, std::vector<float>{1.0f, -2.0f});
  st.add("n", {}, std::vector<std::int64_t>{7});
  // Written by hand: header of 132 bytes padded with 4 spaces to 136 = 0x88.
  const std::string header =
      R"({"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("n":{"dtype":"I64","shape":[],"data_offsets":[8,16]}})";
  REQUIRE(header.size() == 132);
  const std::string expected = std::string("\x88\0\0\0\0\0\0\0", 8) + header + "    " +
                               std::string("\x00\x00\x80\x3f\x00\x00\x00\xc0", 8) + std::string("\x07\0\0\0\0\0\0\0", 8);
  CHECK(io::serialize_safetensors(st) == expected);
  temp_dir d("bytes");
  io::write_safetensors(d.file("a.safetensors"), st);
  CHECK(read_bytes(d.file("a.safetensors")) == expected);
  // Header lengths are multiples of 8 whatever the content.
  for (int len = 1; len <= 9; ++len) {
    io::safetensors s2;
    s2.add(std::string(static_cast<std::size_t>(len), 'x'), {1}, std::vector<float>{0});
    const std::string b = io::serialize_safetensors(s2);
    std::uint64_t n = 0;
    std::memcpy(&n, b.data(), 8);
    CHECK(n % 8 == 0);
    CHECK(b.size() == 8 + n + 4);
    const std::string hdr = b.substr(8, n);
    const auto json_end = hdr.find_last_of('}');
    CHECK(hdr.find_first_not_of(' ', json_end + 1) == std::string::npos);  // padding: spaces only
    CHECK(n - json_end - 1 < 8);
  }
}

TEST_CASE("safetensors reader: a hand-written file in the reference layout (dtype-sorted data, F16/BF16/U8)") {
  // Data laid out as the reference writer does (widest dtype first, then by name), header keys in
  // another order. Values by hand: F16 0x3C00 = 1, 0xC000 = -2, 0x3555 = 0.333251953125;
  // BF16 0x3F80 = 1, 0x4049 = 3.140625.
  const std::string data = std::string("\xfd\xff\xff\xff\xff\xff\xff\xff", 8)       // c: I64 -3
                           + std::string("\x00\x00\x00\x00\x00\x00\xe0\x3f", 8)     // d: F64 0.5
                           + f32_bytes({1.5f, -0.25f})                              // a: F32
                           + std::string("\x80\x3f\x49\x40", 4)                      // b: BF16
                           + std::string("\x00\x3c\x00\xc0\x55\x35", 6)              // h: F16
                           + std::string("\x01\x02\xff", 3);                         // u: U8
  const std::string header =
      R"({"h":{"dtype":"F16","shape":[3],"data_offsets":[36,42]},"__metadata__":{"format":"pt","note":"\u00e9"},)"
      R"("u":{"data_offsets":[42,45],"shape":[1,3],"dtype":"U8"},"a":{"dtype":"F32","shape":[2,1],"data_offsets":[16,24]},)"
      R"("c":{"dtype":"I64","shape":[],"data_offsets":[0,8]},"d":{"dtype":"F64","shape":[1],"data_offsets":[8,16]},)"
      R"("b":{"dtype":"BF16","shape":[2],"data_offsets":[32,36]},"z":{"dtype":"F32","shape":[0,4],"data_offsets":[24,24]},)"
      R"("e":{"dtype":"F32","shape":[2],"data_offsets":[24,32]}})";
  const std::string e_bytes = f32_bytes({7.0f, 8.0f});
  const std::string all = data.substr(0, 24) + e_bytes + data.substr(24);
  temp_dir d("ref");
  const std::string p = d.file("ref.safetensors");
  write_bytes(p, make_file(header, all));
  const io::safetensors st = io::read_safetensors(p);
  CHECK(st.size() == 8);
  CHECK(st.metadata.at("format") == "pt");
  CHECK(st.metadata.at("note") == "\xc3\xa9");
  // Tensors come back in data order.
  std::vector<std::string> order;
  for (const auto& [n, t] : st.tensors()) order.push_back(n);
  CHECK(order == std::vector<std::string>{"c", "d", "a", "z", "e", "b", "h", "u"});
  CHECK(st.at("c").to_int64() == std::vector<std::int64_t>{-3});
  CHECK(st.at("c").shape.empty());
  CHECK(st.at("d").to_floating<double>() == std::vector<double>{0.5});
  CHECK(st.at("a").to_floating<float>() == std::vector<float>{1.5f, -0.25f});
  CHECK(st.at("a").shape == std::vector<std::int64_t>{2, 1});
  CHECK(st.at("e").to_floating<double>() == std::vector<double>{7.0, 8.0});
  CHECK(st.at("b").to_floating<float>() == std::vector<float>{1.0f, 3.140625f});
  CHECK(st.at("h").to_floating<double>() == std::vector<double>{1.0, -2.0, 0.333251953125});
  CHECK(st.at("u").to_int64() == std::vector<std::int64_t>{1, 2, 255});
  CHECK(st.at("z").numel() == 0);
  CHECK_THROWS_AS(st.at("u").to_floating<float>(), io_error);
  CHECK_THROWS_AS(st.at("a").to_int64(), io_error);
  // The header alone, without reading data.
  const auto h = io::read_safetensors_header(p);
  CHECK(h.tensors.size() == 8);
  CHECK(h.data_bytes == all.size());
  CHECK(io::read_metadata(p).at("format") == "pt");
  // "__metadata__": null means no metadata (as in the reference implementation).
  write_bytes(p, make_file(R"({"__metadata__":null,"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", f32_bytes({1, 2})));
  CHECK(io::read_safetensors(p).metadata.empty());
  // The same bytes parsed from memory.
  CHECK(io::parse_safetensors(make_file(header, all)).at("a").to_floating<float>()[0] == 1.5f);
}

TEST_CASE("load_weights: a hand-written file into a hand-built store (F64 and F32 data, I64 counter)") {
  param_store<cpu> s;
  auto w = s.add_parameter("w", shape{2, 2}, init_kind::constant, 0);
  auto m = s.add_buffer("bn.running_mean", shape{2}, 0);
  auto n = s.add_counter("bn.num_batches_tracked");
  s.finalize(0);
  std::string data;
  for (double v : {0.5, -1.25, 3.0, 1e-3}) data.append(reinterpret_cast<const char*>(&v), 8);
  data += std::string("\x2a\0\0\0\0\0\0\0", 8) + f32_bytes({2.5f, -4.0f});
  const std::string header = R"({"w":{"dtype":"F64","shape":[2,2],"data_offsets":[0,32]},)"
                             R"("bn.num_batches_tracked":{"dtype":"I64","shape":[],"data_offsets":[32,40]},)"
                             R"("bn.running_mean":{"dtype":"F32","shape":[2],"data_offsets":[40,48]}})";
  temp_dir d("hand");
  write_bytes(d.file("w.safetensors"), make_file(header, data));
  io::load_weights(d.file("w.safetensors"), s);
  CHECK(std::vector<float>(s.param(w), s.param(w) + 4) == std::vector<float>{0.5f, -1.25f, 3.0f, 1e-3f});
  CHECK(s.buffer(m)[0] == 2.5f);
  CHECK(s.buffer(m)[1] == -4.0f);
  CHECK(s.counter(n) == 42);
  // And what save_weights writes for it: state_dict order, F32, the counter as I64 [].
  io::save_weights(d.file("out.safetensors"), s, {{"who", "test"}});
  const auto back = io::read_safetensors(d.file("out.safetensors"));
  REQUIRE(back.size() == 3);
  CHECK(back.tensors()[0].first == "w");
  CHECK(back.tensors()[1].first == "bn.running_mean");
  CHECK(back.tensors()[2].first == "bn.num_batches_tracked");
  CHECK(back.at("w").type == io::dtype::F32);
  CHECK(back.at("bn.num_batches_tracked").type == io::dtype::I64);
  CHECK(back.at("bn.num_batches_tracked").shape.empty());
  CHECK(back.at("bn.num_batches_tracked").to_int64()[0] == 42);
  CHECK(back.metadata.at("who") == "test");
}

// ============================================================================== corrupt files
TEST_CASE("safetensors reader: every kind of corrupt file is an io_error naming the file and the problem") {
  temp_dir d("corrupt");
  const std::string p = d.file("bad.safetensors");
  const std::string ok_header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string ok_data = f32_bytes({1, 2});
  // The valid base case reads fine.
  write_bytes(p, make_file(ok_header, ok_data));
  CHECK(io::read_safetensors(p).at("a").to_floating<float>() == std::vector<float>{1, 2});

  struct bad_case {
    const char* what;
    std::string bytes;
    std::string phrase;
  };
  auto T2 = [](const std::string& b) { return R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":)" + b + "}"; };
  const std::vector<bad_case> cases = {
      {"empty file", "", "truncated"},
      {"shorter than the length field", "\x08\0\0", "truncated"},
      {"header length beyond the file", le64(1000) + ok_header, "goes beyond the end of the file"},
      {"huge header length", le64(std::uint64_t{1} << 40) + ok_header, "exceeds the limit"},
      {"bad JSON", make_file(R"({"a":{"dtype":"F32",)", ""), "not valid JSON"},
      {"invalid UTF-8", make_file("{\"a\xff\":{}}", ""), "not valid JSON"},
      {"JSON not an object", make_file("[1, 2]", ""), "not an object"},
      {"duplicate key", make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", ok_data),
       "key \"a\" twice"},
      {"metadata not strings", make_file(R"({"__metadata__":{"epoch":3}})", ""), "\"__metadata__\" value of \"epoch\" is not a string"},
      {"metadata not an object", make_file(R"({"__metadata__":"x"})", ""), "\"__metadata__\" is not an object"},
      {"entry not an object", make_file(R"({"a":3})", ""), "tensor 'a': its entry is not an object"},
      {"empty tensor name", make_file(R"({"":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}})", ""), "empty name"},
      {"no dtype", make_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", ok_data), "tensor 'a': no \"dtype\""},
      {"no shape", make_file(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", ok_data), "tensor 'a': no \"shape\""},
      {"no offsets", make_file(R"({"a":{"dtype":"F32","shape":[2]}})", ok_data), "tensor 'a': no \"data_offsets\""},
      {"unknown dtype", make_file(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", ok_data), "unknown dtype \"Q4\""},
      {"negative dimension", make_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", ok_data), "not a non-negative integer"},
      {"fractional dimension", make_file(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", ok_data), "not a non-negative integer"},
      {"shape not an array", make_file(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", ok_data), "\"shape\" is not an array"},
      {"overflowing shape", make_file(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", ok_data), "too large"},
      {"offsets not a pair", make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8]}})", ok_data), "not two non-negative integers"},
      {"negative offset", make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", ok_data), "not two non-negative integers"},
      {"offsets reversed", make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", ok_data), "end before they begin"},
      {"offsets do not match dtype x shape", make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", ok_data.substr(0, 4)),
       "span 4 bytes, but dtype F32 with shape [2] needs 8"},
      {"offsets beyond the data (truncated data)", make_file(ok_header, ok_data.substr(0, 5)), "reach beyond the data section of 5 bytes"},
      {"overlapping tensors", make_file(T2(R"({"dtype":"F32","shape":[2],"data_offsets":[4,12]})"), ok_data + f32_bytes({3})), "overlaps tensor 'a'"},
      {"gap between tensors", make_file(T2(R"({"dtype":"F32","shape":[1],"data_offsets":[12,16]})"), ok_data + f32_bytes({3, 4})),
       "a gap of 4 unused bytes before tensor 'b'"},
      {"data not starting at 0", make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", ok_data), "a gap of 4 unused bytes"},
      {"trailing bytes", make_file(ok_header, ok_data + "xyz"), "3 bytes after the last tensor"},
  };
  for (const auto& c : cases) {
    INFO("case: " << std::string(c.what));
    write_bytes(p, c.bytes);
    expect_io_error([&] { io::read_safetensors(p); }, p, {"not a valid safetensors file", c.phrase});
    // The header-only reader and the weights loader see the same problem.
    expect_io_error([&] { io::read_metadata(p); }, p, {c.phrase});
    param_store<cpu> s;
    s.add_parameter("a", shape{2}, init_kind::constant, 0);
    s.finalize(0);
    expect_io_error([&] { io::load_weights(p, s); }, p, {c.phrase});
    CHECK(s.param(param_ref{0})[0] == 0.0f);
  }
  expect_io_error([&] { io::read_safetensors(d.file("nope.safetensors")); }, d.file("nope.safetensors"), {"cannot open"});
  expect_io_error([&] { io::read_safetensors(d.path.string()); }, d.path.string(), {"not a regular file"});
}

// ============================================================================== round trips
TEST_CASE_TEMPLATE("round trip: save, load into a fresh model with another seed, identical state and outputs", Model,
                   USEG_ALL_MODELS(cpu, 3, 1)) {
  temp_dir d(std::string("rt_") + Model::name());
  const std::string p = d.file("w.safetensors");
  Model a(small_config(1));
  // Change everything away from its initial value: parameters (Adam steps), running statistics and
  // counters (train forwards).
  adam<cpu> opt(a.params(), a.ctx(), adam_options{0.05});
  const auto x = random_input<cpu>(shape{2, 3, 12, 20}, 5);
  const auto y = random_mask<cpu>(shape{2, 1, 12, 20}, 6);
  for (int i = 0; i < 3; ++i) train_step(a, opt, x, y);
  io::save_weights(p, a.params(), {{"model", Model::name()}, {"width", "4"}});

  Model b(small_config(2));
  REQUIRE(!(snapshot<cpu>(b.params()) == snapshot<cpu>(a.params())));
  io::load_weights(p, b.params());
  CHECK(snapshot<cpu>(b.params()) == snapshot<cpu>(a.params()));
  CHECK(a.params().counters()[0] >= 3);

  a.eval();
  b.eval();
  CHECK(a.forward(x).to_host() == b.forward(x).to_host());
  a.train();
  b.train();
  CHECK(a.forward(x).to_host() == b.forward(x).to_host());

  // The file: every entry under its name, in state_dict order, F32 tensors and I64 scalar counters.
  const auto st = io::read_safetensors(p);
  const auto& entries = a.params().entries();
  REQUIRE(st.size() == entries.size());
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const auto& [name, t] = st.tensors()[i];
    INFO(entries[i].name);
    CHECK(name == entries[i].name);
    if (entries[i].kind == entry_kind::counter) {
      CHECK(t.type == io::dtype::I64);
      CHECK(t.shape.empty());
    } else {
      CHECK(t.type == io::dtype::F32);
      CHECK(t.numel() == entries[i].size());
    }
  }
  CHECK(io::read_metadata(p) == std::map<std::string, std::string>{{"model", Model::name()}, {"width", "4"}});
}

TEST_CASE("round trip in double (F64 on disk), and across precisions (F64 file -> float model, F32 file -> double model)") {
  temp_dir d("f64");
  unet<cpu_f64, 3, 1> a(small_config(3));
  adam<cpu_f64> opt(a.params(), a.ctx(), adam_options{0.05});
  train_step(a, opt, random_input<cpu_f64>(shape{1, 3, 8, 8}, 1), random_mask<cpu_f64>(shape{1, 1, 8, 8}, 2));
  io::save_weights(d.file("d.safetensors"), a.params());
  CHECK(io::read_safetensors(d.file("d.safetensors")).at("Conv1.conv.0.weight").type == io::dtype::F64);
  unet<cpu_f64, 3, 1> b(small_config(4));
  io::load_weights(d.file("d.safetensors"), b.params());
  CHECK(snapshot<cpu_f64>(b.params()) == snapshot<cpu_f64>(a.params()));

  unet<cpu, 3, 1> f(small_config(5));
  io::load_weights(d.file("d.safetensors"), f.params());
  const auto ad = a.params().flat_params().to_host();
  const auto ff = f.params().flat_params().to_host();
  REQUIRE(ad.size() == ff.size());
  for (std::size_t i = 0; i < ad.size(); ++i) REQUIRE(ff[i] == static_cast<float>(ad[i]));
  CHECK(f.params().counters() == a.params().counters());

  io::save_weights(d.file("f.safetensors"), f.params());
  unet<cpu_f64, 3, 1> g(small_config(6));
  io::load_weights(d.file("f.safetensors"), g.params());
  const auto gd = g.params().flat_params().to_host();
  for (std::size_t i = 0; i < ad.size(); ++i) REQUIRE(gd[i] == static_cast<double>(ff[i]));
}

// ============================================================================== wrong models
namespace {
/// The problems an independent reading of the two entry lists predicts, as message lines' starts.
std::vector<std::string> predicted_problems(const std::vector<param_entry>& file, const std::vector<param_entry>& model) {
  std::map<std::string, const param_entry*> f;
  for (const auto& e : file) f[e.name] = &e;
  std::set<std::string> m;
  std::vector<std::string> out;
  for (const auto& e : model) {
    m.insert(e.name);
    auto it = f.find(e.name);
    if (it == f.end()) out.push_back("missing: " + e.name + " (");
    else if (!(it->second->dims == e.dims)) out.push_back("wrong shape: " + e.name + " (");
  }
  for (const auto& e : file)
    if (!m.count(e.name)) out.push_back("unexpected: " + e.name + " (");
  return out;
}
template <class From, class To>
void check_wrong_model(const unet_config& from_cfg, const unet_config& to_cfg, std::size_t at_least) {
  temp_dir d(std::string("wrong_") + From::name() + "_" + To::name());
  const std::string p = d.file("w.safetensors");
  From a(from_cfg);
  io::save_weights(p, a.params());
  To b(to_cfg);
  const snapshot<cpu> before(b.params());
  const auto expected = predicted_problems(a.params().entries(), b.params().entries());
  REQUIRE(expected.size() >= at_least);
  try {
    io::load_weights(p, b.params());
    FAIL("loading " << From::name() << " weights into " << To::name() << " did not throw");
  } catch (const io_error& e) {
    const std::string msg = e.what();
    INFO(msg.substr(0, 2000));
    CHECK(msg.find("useg::io::load_weights: '" + p + "' does not match the model: " + std::to_string(expected.size()) +
                   " problems") == 0);
    for (const auto& line : expected) {
      INFO(line);
      CHECK(msg.find("\n  " + line) != std::string::npos);
    }
    // Exactly one line per problem.
    CHECK(static_cast<std::size_t>(std::count(msg.begin(), msg.end(), '\n')) == expected.size());
  }
  CHECK(snapshot<cpu>(b.params()) == before);  // a failed load changes nothing
}
}  // namespace

TEST_CASE("wrong-model loads list every problem in one io_error and leave the model untouched") {
  // U-Net weights into an Attention U-Net: the gates are missing.
  check_wrong_model<unet<cpu, 3, 1>, attention_unet<cpu, 3, 1>>(small_config(1), small_config(2), 2 * 18);
  // Another width: every tensor has the wrong shape.
  check_wrong_model<unet<cpu, 3, 1>, unet<cpu, 3, 1>>(small_config(1, 4), small_config(2, 8), 40);
  // Another depth: the extra level is missing (the shared levels have the same shapes).
  check_wrong_model<unet<cpu, 3, 1>, unet<cpu, 3, 1>>(small_config(1, 4, 2), small_config(2, 4, 3), 20);
  // R2U-Net into U-Net: nothing in common.
  check_wrong_model<r2unet<cpu, 3, 1>, unet<cpu, 3, 1>>(small_config(1), small_config(2), 100);
  // Transposed up-conv weights into the upsample variant.
  unet_config tr = small_config(1);
  tr.up = up_kind::transpose;
  check_wrong_model<unet<cpu, 3, 1>, unet<cpu, 3, 1>>(tr, small_config(2), 8);
  // Other input channels or classes.
  check_wrong_model<unet<cpu, 1, 1>, unet<cpu, 3, 2>>(small_config(1), small_config(2), 2);

  // One hand-checked message, with dtype problems mixed in.
  temp_dir d("dtype");
  param_store<cpu> s;
  s.add_parameter("conv.weight", shape{2, 1, 1, 1}, init_kind::constant, 0);
  s.add_parameter("conv.bias", shape{2}, init_kind::constant, 0);
  s.add_counter("bn.num_batches_tracked");
  s.finalize(0);
  io::safetensors f;
  f.add("conv.weight", {2, 1, 1, 1}, std::vector<std::int64_t>{1, 2});
  f.add("bn.num_batches_tracked", {}, std::vector<float>{3});
  f.add("extra", {1, 2}, std::vector<float>{1, 2});
  io::write_safetensors(d.file("x.safetensors"), f);
  try {
    io::load_weights(d.file("x.safetensors"), s);
    FAIL("no throw");
  } catch (const io_error& e) {
    CHECK(std::string(e.what()) == "useg::io::load_weights: '" + d.file("x.safetensors") +
                                       "' does not match the model: 4 problems\n"
                                       "  wrong dtype: conv.weight (file: I64, model: F32 (F16, BF16, F32 or F64 accepted))\n"
                                       "  missing: conv.bias (model: F32 [2])\n"
                                       "  wrong dtype: bn.num_batches_tracked (file: F32, model: I64 (an integer dtype))\n"
                                       "  unexpected: extra (file: F32 [1, 2])");
  }
}

// ============================================================================== atomic writes
TEST_CASE("atomic write: a write that fails half-way leaves the old file intact and no temporary file") {
  temp_dir d("atomic");
  const std::string p = d.file("w.safetensors");
  unet<cpu, 3, 1> a(small_config(1)), b(small_config(2));
  io::save_weights(p, a.params());
  const std::string old_bytes = read_bytes(p);
  REQUIRE(old_bytes.size() > 8192);

  // Make the second write fail after 4 KiB: the file-size limit (EFBIG) instead of a full disk.
  std::signal(SIGXFSZ, SIG_IGN);
  rlimit saved{};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &saved) == 0);
  rlimit small = saved;
  small.rlim_cur = 4096;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
  bool threw = false;
  try {
    io::save_weights(p, b.params());
  } catch (const io_error& e) {
    threw = true;
    const std::string msg = e.what();
    CHECK(msg.find(p) != std::string::npos);
    CHECK(msg.find("unchanged") != std::string::npos);
  }
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &saved) == 0);
  CHECK(threw);
  CHECK(read_bytes(p) == old_bytes);
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(d.path)) files.push_back(e.path().filename().string());
  CHECK(files == std::vector<std::string>{"w.safetensors"});

  // A successful write replaces the file, leaving nothing else behind.
  io::save_weights(p, b.params());
  CHECK(read_bytes(p) != old_bytes);
  unet<cpu, 3, 1> c(small_config(3));
  io::load_weights(p, c.params());
  CHECK(snapshot<cpu>(c.params()) == snapshot<cpu>(b.params()));
  files.clear();
  for (const auto& e : fs::directory_iterator(d.path)) files.push_back(e.path().filename().string());
  CHECK(files == std::vector<std::string>{"w.safetensors"});

  // A directory that does not exist.
  expect_io_error([&] { io::save_weights(d.file("no/such/dir/w.safetensors"), a.params()); }, d.file("no/such/dir/w.safetensors"),
                  {"cannot write", "temporary file"});
}

// ============================================================================== training state
TEST_CASE("training state: Adam moments, step count and lr restored; continuing gives bit-identical parameters") {
  temp_dir d("state");
  const auto x = random_input<cpu>(shape{2, 3, 16, 16}, 11);
  const auto y = random_mask<cpu>(shape{2, 1, 16, 16}, 12);
  for (bool decoupled : {false, true}) {
    const std::string which = decoupled ? "adamw" : "adam";
    INFO(which);
    attention_unet<cpu, 3, 1> a(small_config(7));
    adam_options o{0.01, 0.9, 0.999, 1e-8, decoupled ? 1e-2 : 1e-4, decoupled};
    adam<cpu> opt(a.params(), a.ctx(), o);
    for (int i = 0; i < 2; ++i) train_step(a, opt, x, y);
    std::mt19937_64 gen(99);
    gen.discard(5);
    std::ostringstream rng_state;
    rng_state << gen;
    const nlohmann::json extra = {{"epoch", 2}, {"rng", rng_state.str()}, {"scheduler", {{"best", 0.25}, {"bad", 1}}}};
    io::save_weights(d.file("last.safetensors"), a.params());
    io::save_training_state(d.file("last.state.safetensors"), opt, extra);
    // Uninterrupted run.
    for (int i = 0; i < 3; ++i) train_step(a, opt, x, y);

    // Resumed run: another seed, another learning rate until the state is loaded.
    attention_unet<cpu, 3, 1> b(small_config(8));
    adam_options o2 = o;
    o2.lr = 0.5;
    adam<cpu> opt2(b.params(), b.ctx(), o2);
    io::load_weights(d.file("last.safetensors"), b.params());
    const nlohmann::json back = io::load_training_state(d.file("last.state.safetensors"), opt2);
    CHECK(back == extra);
    CHECK(opt2.steps() == 2);
    CHECK(opt2.lr() == 0.01);
    std::mt19937_64 gen2;
    std::istringstream(back.at("rng").get<std::string>()) >> gen2;
    CHECK(gen2() == gen());
    for (int i = 0; i < 3; ++i) train_step(b, opt2, x, y);
    CHECK(snapshot<cpu>(b.params()) == snapshot<cpu>(a.params()));
    CHECK(opt2.steps() == 5);

    // Without the moments (a fresh optimizer) the result differs: the check above can fail.
    attention_unet<cpu, 3, 1> c(small_config(8));
    adam<cpu> opt3(c.params(), c.ctx(), o);
    io::load_weights(d.file("last.safetensors"), c.params());
    for (int i = 0; i < 3; ++i) train_step(c, opt3, x, y);
    CHECK(!(snapshot<cpu>(c.params()) == snapshot<cpu>(a.params())));
  }
  // The file itself: the moments under their names, the rest in metadata.
  const auto st = io::read_safetensors(d.file("last.state.safetensors"));
  CHECK(st.find("exp_avg") != nullptr);
  CHECK(st.find("exp_avg_sq") != nullptr);
  CHECK(st.metadata.at("useg.optimizer") == "adamw");
  CHECK(st.metadata.at("useg.steps") == "2");
  CHECK(st.metadata.at("useg.lr") == "0.01");
}

TEST_CASE("training state: SGD momentum round trip, and refusals (other optimizer, other size, not a state file)") {
  temp_dir d("state2");
  const auto x = random_input<cpu>(shape{2, 3, 8, 8}, 1);
  const auto y = random_mask<cpu>(shape{2, 1, 8, 8}, 2);
  unet<cpu, 3, 1> a(small_config(1));
  sgd<cpu> opt(a.params(), a.ctx(), sgd_options{0.05, 0.9, 0, 1e-4, true});
  train_step(a, opt, x, y);
  io::save_weights(d.file("w.safetensors"), a.params());
  io::save_training_state(d.file("s.safetensors"), opt, nlohmann::json::object());
  train_step(a, opt, x, y);
  unet<cpu, 3, 1> b(small_config(2));
  sgd<cpu> opt2(b.params(), b.ctx(), sgd_options{0.05, 0.9, 0, 1e-4, true});
  io::load_weights(d.file("w.safetensors"), b.params());
  CHECK(io::load_training_state(d.file("s.safetensors"), opt2) == nlohmann::json::object());
  train_step(b, opt2, x, y);
  CHECK(snapshot<cpu>(b.params()) == snapshot<cpu>(a.params()));

  // An Adam state into SGD, SGD state into Adam.
  adam<cpu> ad(b.params(), b.ctx());
  io::save_training_state(d.file("adam.safetensors"), ad, {{"epoch", 1}});
  expect_io_error([&] { io::load_training_state(d.file("adam.safetensors"), opt2); }, d.file("adam.safetensors"),
                  {"holds the state of a 'adam' optimizer, not of 'sgd'"});
  // The state of a model of another size: the optimizer is unchanged.
  unet<cpu, 3, 1> big(small_config(3, 8));
  adam<cpu> ad_big(big.params(), big.ctx());
  const auto before = ad_big.state()[0].second->to_host();
  expect_io_error([&] { io::load_training_state(d.file("adam.safetensors"), ad_big); }, d.file("adam.safetensors"),
                  {"does not match the 'adam' optimizer: 2 problems", "wrong shape: exp_avg (file: [",
                   "wrong shape: exp_avg_sq"});
  CHECK(ad_big.state()[0].second->to_host() == before);
  CHECK(ad_big.steps() == 0);
  // A weights file is not a training-state file.
  expect_io_error([&] { io::load_training_state(d.file("w.safetensors"), ad); }, d.file("w.safetensors"),
                  {"not a useg training-state file"});
  // Broken metadata values.
  io::safetensors bad = io::read_safetensors(d.file("adam.safetensors"));
  bad.metadata["useg.steps"] = "12x";
  io::write_safetensors(d.file("bad.safetensors"), bad);
  expect_io_error([&] { io::load_training_state(d.file("bad.safetensors"), ad); }, d.file("bad.safetensors"), {"useg.steps"});
  bad.metadata["useg.steps"] = "3";
  bad.metadata["useg.extra"] = "{oops";
  io::write_safetensors(d.file("bad.safetensors"), bad);
  expect_io_error([&] { io::load_training_state(d.file("bad.safetensors"), ad); }, d.file("bad.safetensors"),
                  {"useg.extra is not valid JSON"});
}
