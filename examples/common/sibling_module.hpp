// sibling_module.hpp — load a shared module from the running program's own folder and look up
// one entry point (the CUDA parts of the example programs and of useg_bench live in such modules,
// loaded only for --device cuda so that --device cpu never maps the CUDA libraries). Linux only
// (dlopen, /proc/self/exe); the caller links ${CMAKE_DL_LIBS}.
#pragma once
#include <dlfcn.h>

#include <filesystem>
#include <string>

#include "useg/core/error.hpp"

namespace lgg {

/// The symbol `entry` of the module `file` in the folder of the running program. The module stays
/// loaded until the process exits. Throws useg::error naming the module's path and the reason.
inline void* sibling_module_symbol(const std::string& file, const char* entry) {
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  const std::string path = (exe.parent_path() / file).string();
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* why = dlerror();
    throw useg::error("cannot load the CUDA module '" + path + "': " + (why ? why : "unknown error"));
  }
  void* sym = dlsym(h, entry);
  if (!sym) throw useg::error("'" + path + "' has no entry point " + entry);
  return sym;
}

}  // namespace lgg
