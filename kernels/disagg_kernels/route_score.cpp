// A routing decision's scoring in one call (disagg/router/native_score.py's `NativeScorer`): the prefix index's
// walk (pi_match), the in-flight blocks' count per worker (pi_shared) and the kv policy's cost of every decode
// worker (disagg/router/policy.py, `RoutingPolicy._cost`, the reference it is tested against decision for
// decision), returning the cheapest candidates in (cost, routing order) order.
//
// Why native: at 256 workers a decision made in Python was ~20 small interpreter steps around two ctypes calls,
// ~45 us a decision with a p99 near the 100 us goal (docs/benchmarks.md, "Decision latency at scale"); here the
// whole scan of 256 workers is a few hundred nanoseconds of arithmetic beside the two table walks.
//
// The cost is computed in the same operations, in the same order, in doubles, as the Python expression, so the
// two agree bit for bit (no fused multiply-add: the library is built with -ffp-contract=off):
//   uncached = num_blocks - total (+ cpu * cpu_factor if cpu) (+ disk * disk_factor if disk)
//   cost     = overlap_weight * uncached + (active + num_blocks - shared) + queue_weight * (queued / block_size)
//              (- session_bonus on the session's last worker)
#include <algorithm>
#include <cstdint>
#include <vector>

extern "C" int32_t pi_match(void* table, const uint64_t* hashes, int64_t n, int32_t* workers, int64_t* counts,
                            int32_t cap);
extern "C" int32_t pi_shared(void* table, const uint64_t* hashes, int64_t n, int32_t* workers, int64_t* counts,
                             int32_t cap);

namespace {

struct Scratch {  // per calling thread, reused: a decision allocates nothing once warm
  std::vector<int32_t> shared_ids, match_of;
  std::vector<int64_t> shared_counts, shared_of;
  std::vector<int32_t> pos;
  std::vector<uint64_t> distinct;
};
thread_local Scratch scratch;

bool before(double cost, int32_t pos, double other_cost, int32_t other_pos) {
  return cost < other_cost || (cost == other_cost && pos < other_pos);
}

}  // namespace

// The scorer's arrays and buffers (their addresses set again whenever they move) and one call's inputs and
// outputs: one pointer crosses per call instead of twenty arguments (ctypes converts each).  The Python mirror
// is disagg/router/native_score.py's `_RouteCall`, field for field.
struct RouteCall {
  void* index;
  void* in_flight;
  const int32_t* order;  // per worker id: position in routing order; < 0: not a decode worker
  const int64_t* active;  // active KV blocks
  const int64_t* queued;  // queued prefill tokens
  const double* cpu_factor;  // the policy's tier factors (min(1, measured or prior))
  const double* disk_factor;
  int32_t* match_ids;
  int64_t* match_counts;
  int32_t* cand_ids;
  double* cand_costs;
  int32_t workers, match_cap, cand_cap, session_worker;  // session_worker: the id the bonus goes to (-1: none)
  int64_t num_blocks, block_size;
  double overlap_weight, queue_weight, bonus;
  int32_t kept, scored;  // out: candidates written (-1: a cost was NaN), decode workers scored
};

extern "C" {

// Writes the matches as pi_match does (up to `match_cap`; returns their count, or -(needed) when too small, and
// nothing else is written then) and up to `cand_cap` candidates, the cheapest decode workers by (cost, routing
// order), with `kept` and `scored` (see RouteCall).
int32_t pi_route(RouteCall* call, const uint64_t* hashes, int64_t n) {
  RouteCall& c = *call;
  const int32_t found = pi_match(c.index, hashes, n, c.match_ids, c.match_counts, c.match_cap);
  if (found < 0) return found;
  const int32_t workers = c.workers;
  int32_t* match_ids = c.match_ids;
  const int64_t* match_counts = c.match_counts;
  int32_t* cand_ids = c.cand_ids;
  double* cand_costs = c.cand_costs;
  const int64_t num_blocks = c.num_blocks;
  Scratch& s = scratch;
  if (static_cast<int32_t>(s.match_of.size()) < workers) {
    s.match_of.assign(workers, -1);
    s.shared_of.assign(workers, 0);
  }
  if (s.shared_ids.empty()) {
    s.shared_ids.resize(64);
    s.shared_counts.resize(64);
  }
  // the shared-blocks term counts a prompt's distinct blocks (the Python policy counts a set): chained hashes
  // never repeat, but a caller's list may
  s.distinct.assign(hashes, hashes + n);
  std::sort(s.distinct.begin(), s.distinct.end());
  const auto distinct = static_cast<int64_t>(std::unique(s.distinct.begin(), s.distinct.end()) - s.distinct.begin());
  const uint64_t* blocks = distinct == n ? hashes : s.distinct.data();
  int32_t sharing;
  while ((sharing = pi_shared(c.in_flight, blocks, distinct, s.shared_ids.data(), s.shared_counts.data(),
                              static_cast<int32_t>(s.shared_ids.size()))) < 0) {
    s.shared_ids.resize(-sharing);
    s.shared_counts.resize(-sharing);
  }
  for (int32_t j = 0; j < found; ++j)
    if (match_ids[j] < workers) s.match_of[match_ids[j]] = j;
  for (int32_t j = 0; j < sharing; ++j)
    if (s.shared_ids[j] < workers) s.shared_of[s.shared_ids[j]] = s.shared_counts[j];

  const double overlap_weight = c.overlap_weight, queue_weight = c.queue_weight, bonus = c.bonus;
  const double block = static_cast<double>(c.block_size);
  const int32_t cap = c.cand_cap, session_worker = c.session_worker;
  if (static_cast<int32_t>(s.pos.size()) < cap) s.pos.resize(cap);
  int32_t kept = 0, scored = 0;
  bool nan = false;
  for (int32_t w = 0; w < workers; ++w) {
    const int32_t pos = c.order[w];
    if (pos < 0) continue;
    ++scored;
    int64_t total = 0, cpu = 0, disk = 0;
    if (const int32_t j = s.match_of[w]; j >= 0) {
      const int64_t* m = match_counts + 4 * j;
      cpu = m[1];
      disk = m[2];
      total = m[0] + cpu + disk;
    }
    double uncached = static_cast<double>(num_blocks - total);
    if (cpu) uncached += static_cast<double>(cpu) * c.cpu_factor[w];
    if (disk) uncached += static_cast<double>(disk) * c.disk_factor[w];
    const double queued_blocks = static_cast<double>(c.queued[w]) / block;
    const int64_t decode = c.active[w] + num_blocks - s.shared_of[w];
    double cost = overlap_weight * uncached + static_cast<double>(decode) + queue_weight * queued_blocks;
    if (w == session_worker) cost -= bonus;
    if (cost != cost) nan = true;
    // keep the `cap` cheapest, sorted (an insertion: most workers fail the first comparison with a full list)
    if (cap == 0 || (kept == cap && !before(cost, pos, cand_costs[kept - 1], s.pos[kept - 1]))) continue;
    int32_t i = kept < cap ? kept++ : cap - 1;
    for (; i > 0 && before(cost, pos, cand_costs[i - 1], s.pos[i - 1]); --i) {
      cand_costs[i] = cand_costs[i - 1];
      cand_ids[i] = cand_ids[i - 1];
      s.pos[i] = s.pos[i - 1];
    }
    cand_costs[i] = cost;
    cand_ids[i] = w;
    s.pos[i] = pos;
  }
  for (int32_t j = 0; j < found; ++j)  // the scratch back to all -1 / 0 for the next call
    if (match_ids[j] < workers) s.match_of[match_ids[j]] = -1;
  for (int32_t j = 0; j < sharing; ++j)
    if (s.shared_ids[j] < workers) s.shared_of[s.shared_ids[j]] = 0;
  c.kept = nan ? -1 : kept;
  c.scored = scored;
  return found;
}

}  // extern "C"
