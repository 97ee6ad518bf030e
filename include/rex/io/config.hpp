// Reading and writing the run configuration (rex/nn/config.hpp) as JSON, and `--set` overrides.
//
// A config file holds up to four sections, each optional, each key optional (missing keys keep
// their defaults):
//   {"model": {...}, "moe": {...}, "psr": {...}, "train": {...}}
// Unknown sections or keys and values of the wrong JSON type are errors that name the key: a typo
// must not silently train the default model. Everything goes through nn::for_each_field, so these
// functions know no field by name.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "rex/nn/config.hpp"

namespace rex {
namespace detail {

// Assigns a JSON value to a config field of type T, or throws naming `key`.
template <class T>
void read_field(const nlohmann::json& j, const std::string& key, T& field) {
  if constexpr (std::is_same_v<T, bool>) {
    REX_CHECK(j.is_boolean(), "config: ", key, " must be true or false, got ", j.dump());
    field = j.get<bool>();
  } else if constexpr (std::is_same_v<T, std::string>) {
    REX_CHECK(j.is_string(), "config: ", key, " must be a string, got ", j.dump());
    field = j.get<std::string>();
  } else if constexpr (std::is_integral_v<T>) {
    // 2.0 is accepted as 2; 2.5 is not; values outside T's range are errors, not wrapped.
    using Limits = std::numeric_limits<T>;
    REX_CHECK(j.is_number() && std::floor(j.get<double>()) == j.get<double>(), "config: ", key,
              " must be an integer, got ", j.dump());
    REX_CHECK(Limits::is_signed || j.get<double>() >= 0, "config: ", key,
              " cannot be negative, got ", j.dump());
    if (j.is_number_unsigned()) {
      REX_CHECK(j.get<uint64_t>() <= static_cast<uint64_t>(Limits::max()), "config: ", key,
                " is too large, got ", j.dump());
      field = static_cast<T>(j.get<uint64_t>());
    } else if (j.is_number_integer()) {
      field = static_cast<T>(j.get<int64_t>());
    } else {
      const double v = j.get<double>(), bound = std::ldexp(1.0, Limits::digits);  // 2^63 or 2^64
      REX_CHECK(v < bound && v >= (Limits::is_signed ? -bound : 0.0), "config: ", key,
                " is out of range, got ", j.dump());
      field = static_cast<T>(v);
    }
  } else {
    REX_CHECK(j.is_number(), "config: ", key, " must be a number, got ", j.dump());
    field = j.get<T>();
  }
}

}  // namespace detail

namespace io {

// Applies the keys present in `j` on top of `config`.
inline void apply_json(nn::RunConfig& config, const nlohmann::json& j) {
  REX_CHECK(j.is_object(), "config: the top level must be a JSON object, got ", j.type_name());
  std::set<std::string> known_sections, seen;
  nn::for_each_field(config, [&](const char* section, const char* key, auto& field, const char*) {
    known_sections.insert(section);
    if (!j.contains(section)) return;
    const nlohmann::json& part = j.at(section);
    REX_CHECK(part.is_object(), "config: section \"", section, "\" must be an object, got ",
              part.type_name());
    if (!part.contains(key)) return;
    seen.insert(std::string(section) + "." + key);
    rex::detail::read_field(part.at(key), std::string(section) + "." + key, field);
  });
  for (const auto& [section, part] : j.items()) {
    REX_CHECK(known_sections.count(section), "config: unknown section \"", section,
              "\" (known: model, moe, psr, train)");
    for (const auto& item : part.items()) {
      const std::string name = section + "." + item.key();
      REX_CHECK(seen.count(name), "config: unknown key \"", name,
                "\" (docs/formats.md lists every key)");
    }
  }
}

inline nlohmann::json to_json(const nn::RunConfig& config) {
  nlohmann::json j = nlohmann::json::object();
  nn::for_each_field(config, [&](const char* section, const char* key, const auto& field,
                                 const char*) { j[section][key] = field; });
  return j;
}

inline nn::RunConfig config_from_json(const nlohmann::json& j) {
  nn::RunConfig config;
  apply_json(config, j);
  return config;
}

// Parses JSON text; `what` names the source (a path) in errors.
inline nn::RunConfig parse_config(const std::string& text, const std::string& what) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw Error("config: " + what + " is not valid JSON: " + e.what());
  }
  try {
    return config_from_json(j);
  } catch (const Error& e) {
    throw Error(std::string(e.what()) + " (in " + what + ")");
  }
}

// Applies one `section.key=value` override. The value is read as JSON when it parses as JSON
// (numbers, true/false, quoted strings) and as a plain string otherwise, so both
// `psr.schedule=stepwise` and `train.lr=1e-3` work.
inline void apply_override(nn::RunConfig& config, const std::string& assignment) {
  const size_t eq = assignment.find('=');
  const size_t dot = assignment.find('.');
  REX_CHECK(eq != std::string::npos && dot != std::string::npos && dot < eq,
            "--set expects section.key=value (e.g. moe.top_k=2), got \"", assignment, "\"");
  const std::string section = assignment.substr(0, dot);
  const std::string key = assignment.substr(dot + 1, eq - dot - 1);
  const std::string text = assignment.substr(eq + 1);
  nlohmann::json value = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) value = text;
  nlohmann::json patch;
  patch[section][key] = value;
  apply_json(config, patch);
}

}  // namespace io
}  // namespace rex
