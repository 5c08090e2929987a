// See algo_choice.h.
#include "cpu/algo_choice.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <utility>
#include <vector>

namespace unetx {
namespace {

struct Entry {
  AlgoDecision decision;
};

std::mutex& table_mutex() {
  static std::mutex m;
  return m;
}
std::map<std::pair<std::string, std::string>, Entry>& table() {
  static std::map<std::pair<std::string, std::string>, Entry> t;
  return t;
}

// The candidate UNETX_CONV_ALGO forces for this family, or -1.
int forced(const std::string& family, const std::vector<AlgoCandidate>& candidates) {
  const char* env = std::getenv("UNETX_CONV_ALGO");
  if (!env || !*env) return -1;
  std::stringstream ss(env);
  std::string item;
  while (std::getline(ss, item, ',')) {
    std::string fam, name = item;
    if (const auto eq = item.find('='); eq != std::string::npos) fam = item.substr(0, eq), name = item.substr(eq + 1);
    if (!fam.empty() && fam != family) continue;
    for (size_t i = 0; i < candidates.size(); ++i)
      if (candidates[i].name == name) return static_cast<int>(i);
  }
  return -1;
}

// Runs the candidates in list order (skipping `skip`, which refused) until one applies.
int run_in_order(const std::vector<AlgoCandidate>& candidates, int skip) {
  for (size_t i = 0; i < candidates.size(); ++i)
    if (static_cast<int>(i) != skip && candidates[i].run(true)) return static_cast<int>(i);
  return -1;
}

}  // namespace

int run_fastest(const std::string& family, const std::string& key, const std::vector<AlgoCandidate>& candidates) {
  if (candidates.empty()) return -1;
  if (const int f = forced(family, candidates); f >= 0)
    return candidates[f].run(true) ? f : run_in_order(candidates, f);
  if (candidates.size() == 1) return candidates[0].run(true) ? 0 : -1;
  const auto id = std::make_pair(family, key);
  // The winner is remembered by name: the same key may come with another candidate list (UNETX_WINOGRAD changed
  // between calls), where an index would name another candidate. A winner not in this list means measuring again;
  // so does a loaded decision measured among other candidates (an earlier process's UNETX_WINOGRAD=0, another
  // build's list), which would otherwise keep a candidate it never saw from being measured on this machine.
  std::string winner;
  {
    std::lock_guard<std::mutex> lock(table_mutex());
    const auto it = table().find(id);
    if (it != table().end()) {
      const AlgoDecision& d = it->second.decision;
      bool same = d.names.size() == candidates.size();
      for (size_t i = 0; same && i < candidates.size(); ++i) same = d.names[i] == candidates[i].name;
      if (!d.loaded || same) winner = d.chosen;
    }
  }
  int cached = -1;
  for (size_t i = 0; i < candidates.size() && !winner.empty(); ++i)
    if (candidates[i].name == winner) cached = static_cast<int>(i);
  if (cached >= 0) return candidates[cached].run(true) ? cached : run_in_order(candidates, cached);

  // Measure: every candidate once, then the remaining runs (kMeasureRuns in all: the first run pays one-off costs, the
  // best time is kept), except for candidates that cannot win (kHopeless).
  Entry e;
  e.decision.family = family;
  e.decision.key = key;
  const size_t n = candidates.size();
  std::vector<double> t(n, -1);  // best time so far; -1: does not apply
  const auto timed = [&](size_t i) {
    const auto t0 = std::chrono::steady_clock::now();
    const bool ok = candidates[i].run(false);
    return ok ? std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() : -1.0;
  };
  double first = -1;  // the fastest first run
  for (size_t i = 0; i < n; ++i) {
    t[i] = timed(i);
    if (t[i] >= 0 && (first < 0 || t[i] < first)) first = t[i];
  }
  for (int r = 1; r < kMeasureRuns; ++r)
    for (size_t i = 0; i < n; ++i) {
      if (t[i] < 0 || (t[i] > kHopeless * first && t[i] - first > kHopelessMargin)) continue;
      const double dt = timed(i);
      t[i] = dt < 0 ? -1 : std::min(t[i], dt);
    }
  int best = -1;
  for (size_t i = 0; i < n; ++i) {
    e.decision.names.push_back(candidates[i].name);
    e.decision.seconds.push_back(t[i]);
    if (t[i] >= 0 && (best < 0 || t[i] < t[best] * (1.0 - kAlgoTie))) best = static_cast<int>(i);
  }
  if (best < 0) return -1;
  // each candidate wrote its own slot: the winner's result stands as it is
  e.decision.chosen = candidates[best].name;
  {
    std::lock_guard<std::mutex> lock(table_mutex());
    table()[id] = e;
  }
  return best;
}

std::vector<AlgoDecision> algo_choices() {
  std::lock_guard<std::mutex> lock(table_mutex());
  std::vector<AlgoDecision> out;
  for (const auto& [id, e] : table()) out.push_back(e.decision);
  return out;
}

int load_algo_choices(const std::vector<AlgoDecision>& decisions) {
  std::lock_guard<std::mutex> lock(table_mutex());
  int taken = 0;
  for (const auto& d : decisions) {
    if (d.family.empty() || d.key.empty() || d.names.size() != d.seconds.size()) continue;
    if (std::find(d.names.begin(), d.names.end(), d.chosen) == d.names.end()) continue;
    const auto [it, inserted] = table().try_emplace(std::make_pair(d.family, d.key));
    if (!inserted) continue;  // decided here already: this process's own measurement stands
    it->second.decision = d;
    it->second.decision.loaded = true;
    ++taken;
  }
  return taken;
}

void clear_algo_choices() {
  std::lock_guard<std::mutex> lock(table_mutex());
  table().clear();
}

}  // namespace unetx
