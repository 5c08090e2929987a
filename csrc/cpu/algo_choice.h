// Choosing an implementation by measurement: "run the fastest of these candidates for this key, measured once,
// remembered for the process".
//
// Why: which implementation is fastest (unetx's GEMM weight gradient or oneDNN's, a Winograd convolution or a direct
// one) depends on the shape, the dtype and the CPU (AVX2 or AVX-512, native bf16 or not), and a constant threshold
// tuned on one machine is wrong on the next. So the first call for a key times every candidate that applies, on the
// real operands, and every later call for that key runs the winner only.
//
// Use (see conv_bn_relu.cpp, the weight gradient, for a real one):
//     std::optional<at::Tensor> out[2];
//     const int ran = run_fastest("weight_grad", key, {
//         {"gemm",   [&](bool) { out[0] = own_kernel(...); return out[0].has_value(); }},
//         {"onednn", [&](bool) { out[1] = aten_kernel(...); return true; }}});
//     // out[ran] holds the result (ran == -1: no candidate applied)
//
// - `family` names the decision ("weight_grad", "conv3x3", ...); `key` is everything the speed depends on (shapes,
//   dtype, layout, options), e.g. made with algo_key(...). Candidates are listed in order of preference: where two
//   measure alike (within kTie) the earlier one wins, and with nothing measured yet the list order is the fallback.
// - A candidate returns false where it does not apply to these operands (a dtype it lacks, NaN where it would
//   differ from stock...). It then is not timed and not chosen for this key (the decision is cached all the same:
//   a refusal for the dtype must not make every call measure again). Later, if the cached winner refuses, the
//   other candidates run in list order.
// - Each candidate writes its own result (its own slot): the call returns the index of the candidate whose result
//   stands. While measuring, each applicable candidate runs kMeasureRuns times (the first run also pays one-off
//   costs such as oneDNN's primitive creation, so the minimum is kept), all first runs before any second one; a
//   candidate whose first run is hopeless (kHopeless) runs once.
// - UNETX_CONV_ALGO forces a choice, for tests and experiments: a comma-separated list of `family=name` (or a bare
//   `name`, which applies to every family that has a candidate of that name), e.g.
//   UNETX_CONV_ALGO=weight_grad=onednn_planar. A forced candidate that does not apply falls back to the others.
//   UNETX_CONV_ALGO is read at every call (cheap), so a test may change it between calls; clear_algo_choices()
//   forgets what was measured.
// - Timing is host wall-clock: only for synchronous (CPU) candidates.
// - Thread-safe; two threads measuring the same new key at once both measure, and one result is kept.
//
// algo_choices() lists what was decided, with the measured seconds, for reports (unetx._C.algo_choices()).
// load_algo_choices() takes decisions an earlier process measured on this machine (python/unetx/ops/algo_choice.py
// keeps them in a file per machine and build): a loaded winner is run like a measured one, without measuring, where
// the call's candidate list is the one it was measured among (else the call measures and replaces it).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace unetx {

struct AlgoCandidate {
  std::string name;
  // Computes into the caller's slot; false where it does not apply. `only` is true when this run is the call's only
  // one (not a measurement), so the candidate may release operands the caller does not need afterwards.
  std::function<bool(bool only)> run;
};

// Two candidates within this relative margin count as equally fast: the earlier one in the list wins.
constexpr double kAlgoTie = 0.03;
constexpr int kMeasureRuns = 2;
// A first run more than kHopeless times the fastest first run and kHopelessMargin seconds longer is not run again:
// the margin is well above the one-off costs a first run can carry (oneDNN's primitive creation and JIT, the thread
// pool's start, first-touch page faults: tens of milliseconds), and a second run of such a candidate would only
// lengthen the measuring call (ATen's bfloat16 convolutions on a CPU without native bfloat16: seconds a call).
constexpr double kHopeless = 4.0;
constexpr double kHopelessMargin = 0.25;

// Runs one candidate (see above) and returns its index, or -1 where none applied.
int run_fastest(const std::string& family, const std::string& key, const std::vector<AlgoCandidate>& candidates);

inline std::string to_key_part(const std::string& v) {
  return v;
}
inline std::string to_key_part(const char* v) {
  return v;
}
template <typename T>
std::string to_key_part(const T& v) {
  return std::to_string(v);
}
// A key from the values the speed depends on: algo_key("k3", N, C, ...) -> "k3,4,32,...".
template <typename... Ts>
std::string algo_key(const Ts&... parts) {
  std::string s;
  ((s += (s.empty() ? "" : ","), s += to_key_part(parts)), ...);
  return s;
}

struct AlgoDecision {
  std::string family, key, chosen;
  std::vector<std::string> names;  // the candidates measured
  std::vector<double> seconds;     // their best time (negative: did not apply)
  bool loaded = false;             // from load_algo_choices, not measured by this process
};
std::vector<AlgoDecision> algo_choices();
void clear_algo_choices();
// Remembers each decision whose key this process has not decided yet and whose winner is among its names (others
// are skipped: the Python binding has already refused entries of the wrong types); returns how many were taken.
int load_algo_choices(const std::vector<AlgoDecision>& decisions);

}  // namespace unetx
