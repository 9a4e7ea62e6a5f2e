// The router's prefix index storage in C++ (disagg/router/block_table.py's `NativeBlockTable`; the Python
// `PyBlockTable` is the reference it is tested against, operation for operation).
//
// Why native: the router applies its workers' KV events and routes in one Python process.  At 256 workers the
// events arrive at up to ~1M block hashes a second; applied in Python they take the interpreter a core's worth
// of time, and a routing decision waits for the GIL behind them (docs/benchmarks.md, "Decision latency at
// scale").  Called through ctypes, every function here runs without the GIL: a decision's walk and an event
// batch's stores run side by side, serialized only by the table's own mutex for the microseconds they touch it.
//
// State, as the Python table: block hash -> its holders (worker id, tier bits) in the order they came; a bound
// `max_blocks` past which the oldest-stored hash (by first store; a hash dropped and stored again is new) leaves
// the index.  Tier bits: 1 device, 2 CPU, 4 disk.  Unlike the Python table it keeps no set per worker: what a
// worker holds is found by a scan (see pi_worker_blocks).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <utility>
#include <vector>

namespace {

constexpr uint8_t kDevice = 1, kCpu = 2, kDisk = 4, kOffload = kCpu | kDisk;
constexpr int kInline = 4;  // holders kept in the slot itself; a block held by more moves them to a vector

struct Owner {
  int32_t worker;
  uint8_t bits;
};

// One block: its hash, when it was first stored (0: the slot is empty) and its holders in arrival order, in
// `inl[0..n)` or, past kInline, all of them in `*more`.  64 bytes: one cache line per lookup.
struct Slot {
  uint64_t key;
  uint64_t gen;
  std::vector<Owner>* more;
  int32_t n;
  Owner inl[kInline];

  int32_t size() const { return more ? static_cast<int32_t>(more->size()) : n; }
  Owner* data() { return more ? more->data() : inl; }
  const Owner* data() const { return more ? more->data() : inl; }
  Owner* find(int32_t w) {
    Owner* o = data();
    for (int32_t i = 0, k = size(); i < k; ++i)
      if (o[i].worker == w) return o + i;
    return nullptr;
  }
  void push(Owner o) {
    if (!more && n < kInline) {
      inl[n++] = o;
      return;
    }
    if (!more) more = new std::vector<Owner>(inl, inl + n);
    more->push_back(o);
  }
  void erase(Owner* o) {  // order kept: a holder that comes back is last, as in the Python dict
    if (more) {
      more->erase(more->begin() + (o - more->data()));
      return;
    }
    std::memmove(o, o + 1, (inl + n - (o + 1)) * sizeof(Owner));
    --n;
  }
};

uint8_t bits_of(const Slot& s, int32_t w) {
  const Owner* o = s.data();
  for (int32_t i = 0, k = s.size(); i < k; ++i)
    if (o[i].worker == w) return o[i].bits;
  return 0;
}

// Open addressing with linear probing and backward-shift deletion (no tombstones): a lookup touches one or two
// cache lines, where a node-based map chases a pointer per entry into a 1M-entry heap.
class Blocks {
 public:
  Blocks() : slots_(1024) {}
  ~Blocks() {
    for (Slot& s : slots_)
      if (s.gen) delete s.more;
  }
  size_t size() const { return size_; }
  std::vector<Slot>& slots() { return slots_; }

  Slot* find(uint64_t key) {
    for (size_t i = home(key);; i = (i + 1) & mask()) {
      Slot& s = slots_[i];
      if (!s.gen) return nullptr;
      if (s.key == key) return &s;
    }
  }

  Slot* insert(uint64_t key, uint64_t gen) {  // key must be absent
    if (10 * (size_ + 1) > 7 * slots_.size()) grow();
    size_t i = home(key);
    while (slots_[i].gen) i = (i + 1) & mask();
    slots_[i] = Slot{key, gen, nullptr, 0, {}};
    ++size_;
    return &slots_[i];
  }

  void erase(Slot* slot) {
    delete slot->more;
    size_t i = static_cast<size_t>(slot - slots_.data());
    for (size_t j = (i + 1) & mask(); slots_[j].gen; j = (j + 1) & mask()) {
      size_t k = home(slots_[j].key);  // slot j may move back to i unless its home lies cyclically in (i, j]
      bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
      if (!stays) {
        slots_[i] = slots_[j];
        i = j;
      }
    }
    slots_[i].gen = 0;
    slots_[i].more = nullptr;
    --size_;
  }

 private:
  size_t mask() const { return slots_.size() - 1; }
  size_t home(uint64_t key) const { return static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_) & mask(); }

  void grow() {
    std::vector<Slot> old(slots_.size() * 2);
    old.swap(slots_);
    --shift_;
    size_ = 0;
    for (Slot& s : old) {
      if (!s.gen) continue;
      size_t i = home(s.key);
      while (slots_[i].gen) i = (i + 1) & mask();
      slots_[i] = s;
      ++size_;
    }
  }

  std::vector<Slot> slots_;
  size_t size_ = 0;
  int shift_ = 64 - 10;  // home() takes the top log2(capacity) bits of the multiplied key
};

struct Table {
  int64_t max_blocks;
  uint64_t next_gen = 0;
  Blocks blocks;
  std::deque<std::pair<uint64_t, uint64_t>> order;  // (hash, gen) by first store; pairs of dropped hashes are stale
  std::vector<int64_t> tally;  // pi_shared's count per worker id (zero between calls)
  std::mutex mu;

  // An unbounded table (the router's in-flight blocks) never evicts: it keeps no store order to compact.
  bool bounded() const { return max_blocks < INT64_MAX; }

  void evict_oldest() {
    while (!order.empty()) {
      auto [h, gen] = order.front();
      order.pop_front();
      Slot* s = blocks.find(h);
      if (!s || s->gen != gen) continue;  // stale: dropped (and maybe stored again) since
      blocks.erase(s);
      return;
    }
  }

  void compact() {  // drops stale order pairs once they outnumber the live ones (keeps the order bounded)
    if (!bounded() || order.size() < 2 * blocks.size() + 1024) return;
    std::deque<std::pair<uint64_t, uint64_t>> live;
    for (const auto& p : order) {
      Slot* s = blocks.find(p.first);
      if (s && s->gen == p.second) live.push_back(p);
    }
    order.swap(live);
  }

  void drop(Slot* s, int32_t w, uint8_t bit) {  // tier `bit` of block `s` from worker `w`
    Owner* o = s->find(w);
    if (!o) return;
    uint8_t left = o->bits & static_cast<uint8_t>(~bit);
    if (left) {
      o->bits = left;
      return;
    }
    s->erase(o);
    if (!s->size()) blocks.erase(s);
  }
};

}  // namespace

extern "C" {

void* pi_new(int64_t max_blocks) {
  auto* t = new Table();
  t->max_blocks = max_blocks;
  return t;
}

void pi_free(void* table) { delete static_cast<Table*>(table); }

int64_t pi_size(void* table) {
  auto* t = static_cast<Table*>(table);
  std::lock_guard<std::mutex> lock(t->mu);
  return static_cast<int64_t>(t->blocks.size());
}

void pi_store(void* table, int32_t w, const uint64_t* hashes, int64_t n, uint8_t bit) {
  auto* t = static_cast<Table*>(table);
  std::lock_guard<std::mutex> lock(t->mu);
  for (int64_t i = 0; i < n; ++i) {
    uint64_t h = hashes[i];
    Slot* s = t->blocks.find(h);
    if (!s) {
      if (static_cast<int64_t>(t->blocks.size()) >= t->max_blocks) t->evict_oldest();
      uint64_t gen = ++t->next_gen;
      s = t->blocks.insert(h, gen);
      if (t->bounded()) t->order.emplace_back(h, gen);
    }
    if (Owner* o = s->find(w))
      o->bits |= bit;
    else
      s->push(Owner{w, bit});
  }
}

void pi_drop(void* table, int32_t w, const uint64_t* hashes, int64_t n, uint8_t bit) {
  auto* t = static_cast<Table*>(table);
  std::lock_guard<std::mutex> lock(t->mu);
  for (int64_t i = 0; i < n; ++i)
    if (Slot* s = t->blocks.find(hashes[i])) t->drop(s, w, bit);
  t->compact();
}

// The hashes worker `w` holds in any tier of `mask`: how many, written to `out` up to `cap` (call again with a
// larger buffer when the count exceeds it).  A scan of the whole table: for snapshots, CLEARED events and a
// worker's removal, which are rare; keeping a set per worker instead cost every store and drop a second insert.
int64_t pi_worker_blocks(void* table, int32_t w, uint8_t mask, uint64_t* out, int64_t cap) {
  auto* t = static_cast<Table*>(table);
  std::lock_guard<std::mutex> lock(t->mu);
  int64_t count = 0;
  for (const Slot& s : t->blocks.slots()) {
    if (!s.gen || !(bits_of(s, w) & mask)) continue;
    if (count < cap) out[count] = s.key;
    ++count;
  }
  return count;
}

// Blocks held per worker id (any tier), for ids 0..n-1: one scan for every worker.
void pi_worker_counts(void* table, int64_t* counts, int32_t n) {
  auto* t = static_cast<Table*>(table);
  std::lock_guard<std::mutex> lock(t->mu);
  std::fill(counts, counts + n, 0);
  for (const Slot& s : t->blocks.slots()) {
    if (!s.gen) continue;
    const Owner* o = s.data();
    for (int32_t i = 0, k = s.size(); i < k; ++i)
      if (o[i].worker < n) ++counts[o[i].worker];
  }
}

// Tier `bit` of every block worker `w` holds (a snapshot's clear, a CLEARED event; all tiers: its removal), in
// one scan and one call: the hashes are collected first, since a drop shifts later slots back.
void pi_drop_all(void* table, int32_t w, uint8_t bit) {
  auto* t = static_cast<Table*>(table);
  std::lock_guard<std::mutex> lock(t->mu);
  std::vector<uint64_t> mine;
  for (const Slot& s : t->blocks.slots())
    if (s.gen && (bits_of(s, w) & bit)) mine.push_back(s.key);
  for (uint64_t h : mine)
    if (Slot* s = t->blocks.find(h)) t->drop(s, w, bit);
  t->compact();
}

// The holders of block `h` in arrival order: how many, with up to `cap` ids and tier bits written.
int32_t pi_owners(void* table, uint64_t h, int32_t* workers, uint8_t* bits, int32_t cap) {
  auto* t = static_cast<Table*>(table);
  std::lock_guard<std::mutex> lock(t->mu);
  Slot* s = t->blocks.find(h);
  if (!s) return 0;
  const Owner* o = s->data();
  for (int32_t j = 0; j < s->size() && j < cap; ++j) {
    workers[j] = o[j].worker;
    bits[j] = o[j].bits;
  }
  return s->size();
}

// For `n` distinct hashes, how many of them each worker holds (any tier): writes up to `cap` (worker id, count)
// pairs of the workers holding any, in the order first met; returns how many, or -(needed) when `cap` is too
// small.  The router's in-flight table asks it per decision: whose running requests hold which of a prompt's
// blocks (router/in_flight.py).  Counted by worker id (ids are small and dense): a system prompt in flight on
// every worker costs one increment per holder, not a search of the workers found so far.
int32_t pi_shared(void* table, const uint64_t* hashes, int64_t n, int32_t* workers, int64_t* counts, int32_t cap) {
  auto* t = static_cast<Table*>(table);
  std::lock_guard<std::mutex> lock(t->mu);
  std::vector<int64_t>& tally = t->tally;  // all zero between calls
  std::vector<int32_t> found;
  for (int64_t i = 0; i < n; ++i) {
    const Slot* s = t->blocks.find(hashes[i]);
    if (!s) continue;
    const Owner* o = s->data();
    for (int32_t j = 0, k = s->size(); j < k; ++j) {
      const auto w = static_cast<size_t>(o[j].worker);
      if (w >= tally.size()) tally.resize(w + 1, 0);
      if (tally[w]++ == 0) found.push_back(o[j].worker);
    }
  }
  const auto k = static_cast<int32_t>(found.size());
  for (int32_t j = 0; j < k; ++j) {
    if (j < cap) {
      workers[j] = found[j];
      counts[j] = tally[found[j]];
    }
    tally[found[j]] = 0;
  }
  return k > cap ? -k : k;
}

// How each worker holding the first block would serve the leading blocks (PyBlockTable.match's walk): per worker,
// its device run, then CPU / disk blocks from the first block missing on device, and how many a peer could read
// (the device run and the CPU blocks before any disk-only one).  Writes up to `cap` workers (ids, and 4 counts
// each: device, cpu, disk, exportable) in the first block's holder order; returns how many, or -(needed) when
// `cap` is too small.
int32_t pi_match(void* table, const uint64_t* hashes, int64_t n, int32_t* workers, int64_t* counts, int32_t cap) {
  auto* t = static_cast<Table*>(table);
  std::lock_guard<std::mutex> lock(t->mu);
  if (n == 0) return 0;
  Slot* first = t->blocks.find(hashes[0]);
  if (!first) return 0;
  const int32_t k = first->size();
  if (k > cap) return -k;
  std::vector<uint8_t> active(k, 1), on_device(k, 1), cpu_open(k, 1);
  for (int32_t j = 0; j < k; ++j) {
    workers[j] = first->data()[j].worker;
    std::fill(counts + 4 * j, counts + 4 * j + 4, 0);
  }
  for (int64_t i = 0; i < n; ++i) {
    const Slot* s = i == 0 ? first : t->blocks.find(hashes[i]);
    if (!s) break;
    bool any = false;
    for (int32_t j = 0; j < k; ++j) {
      if (!active[j]) continue;
      uint8_t bits = bits_of(*s, workers[j]);
      int64_t* c = counts + 4 * j;
      if ((bits & kDevice) && on_device[j]) {
        ++c[0];
        ++c[3];
      } else if (!(bits & kOffload)) {
        active[j] = 0;  // its run ends here
        continue;
      } else {
        on_device[j] = 0;
        if (bits & kCpu) {
          ++c[1];
          if (cpu_open[j]) ++c[3];
        } else {
          ++c[2];
          cpu_open[j] = 0;
        }
      }
      any = true;
    }
    if (!any) break;
  }
  return k;
}

}  // extern "C"
