// JSON text in and out, strictly: what every rex file reader parses JSON with.
//
// parse_json turns every parser error (bad syntax, invalid UTF-8, a number beyond double range such
// as 1e999) into a rex::Error that names the source, and refuses a key given twice in one object
// (nlohmann's parser would silently keep the last one), naming it by its path ("model.d_model").
// json_text shows a value in an error message without ever throwing, even when a string in it
// holds bytes that are not UTF-8.
#pragma once

#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "rex/core/error.hpp"

namespace rex::io {

// A JSON value as text for an error message; invalid UTF-8 in a string is shown as U+FFFD instead
// of making dump() throw.
inline std::string json_text(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// Parses JSON text strictly; `what` (a path) starts every error. The parser's own errors (bad
// syntax, invalid UTF-8, a number beyond double range such as 1e999) become rex::Error, and a key
// repeated in one object is an error naming it (the parser would silently keep the last one).
inline nlohmann::json parse_json(std::string_view text, const std::string& what) {
  struct Object {
    std::set<std::string> keys;
    std::string current;  // the key being read
  };
  std::vector<Object> open;  // the objects being parsed, innermost last
  auto reject_repeats = [&](int, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using Event = nlohmann::json::parse_event_t;
    if (event == Event::object_start) open.emplace_back();
    if (event == Event::object_end) open.pop_back();
    if (event == Event::key) {
      Object& inner = open.back();
      inner.current = parsed.get<std::string>();
      std::string path;  // section.key for a config file
      for (size_t i = 0; i + 1 < open.size(); ++i) path += open[i].current + ".";
      REX_CHECK(inner.keys.insert(inner.current).second, what, ": key \"", path, inner.current,
                "\" appears twice");
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), reject_repeats);
  } catch (const nlohmann::json::exception& e) {
    throw Error(detail::concat(what, " is not valid JSON: ", e.what()));
  }
}

}  // namespace rex::io
