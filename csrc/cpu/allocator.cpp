// A CPU allocator that keeps freed large blocks for reuse, up to a byte cap: what the trainer
// installs on CPU runs (rlhf.stage.bound_cpu_allocator_slack) so that the resident set follows
// the live tensors, as rlhf plan counts them, without paying a page fault per fresh page.
//
// Why: CPU tensors come from glibc's malloc through c10::alloc_cpu. glibc raises its mmap
// threshold to the size of each mmap'd block freed (up to 32 MiB), so after the first frees a
// forward/backward's activations come from the heap, and the heap fragments: at the
// Qwen2.5-0.5B shape (fp32, batch 4, 64 tokens) a PPO iteration's resident set peaked ~1 GiB
// above its live tensors (1.5x the plan) and never came down. A fixed threshold (mallopt) fixes
// the memory but maps every block of 128 KiB or more afresh: 10 M page faults an iteration there,
// 34% slower on the development VM. This allocator maps blocks of kMinBytes or more itself and
// keeps freed ones, oldest evicted first, while they total at most max_cached bytes; a request
// takes the smallest cached block of at least its size and at most 1/8 larger (a training loop
// asks for the same sizes every layer and every step). Smaller requests go to c10::alloc_cpu as
// before. The resident set is then the live tensors plus at most max_cached bytes.
//
// The data pointer is the deleter's context (as c10's default CPU allocator), so raw_allocate /
// raw_deallocate work; the block sizes are kept in a table. Allocations, small and large, are
// reported to the profiler as c10's default allocator reports them.
//
// Once installed it is also where the native GAE's outputs come from (register.cpp's OutputCache
// then keeps nothing: it gives back what it held here), so one cap bounds all cached blocks.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace rlhf_native {

// register.cpp: frees the GAE output cache's blocks, which it keeps no more once this is installed
void release_gae_output_cache();

namespace {

class BlockCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t{128} << 10;

  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();  // never destroyed: tensors may outlive exit
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) {  // c10's own allocation, reported as c10's default allocator does
      void* ptr = n == 0 ? nullptr : c10::alloc_cpu(n);
      if (ptr != nullptr) c10::profiledCPUMemoryReporter().New(ptr, n);
      return {ptr, ptr, &free_small, c10::Device(c10::DeviceType::CPU)};
    }
    const size_t bytes = round_up(n);
    void* ptr = take_cached(bytes);
    if (ptr == nullptr) ptr = map_fresh(bytes);
    c10::profiledCPUMemoryReporter().New(ptr, n);
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release_any; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // (re)configure; the first call installs this allocator as c10's CPU allocator
  void configure(size_t max_cached) {
    std::vector<Free> evicted;
    bool installing = false;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      max_cached_ = max_cached;
      evict_over_cap(&evicted);
      if (!installed_) {
        pthread_atfork([] { get().mutex_.lock(); }, [] { get().mutex_.unlock(); },
                       [] { get().mutex_.unlock(); });
        c10::SetCPUAllocator(this, /*priority=*/1);
        installed_ = true;  // before the release below: the GAE cache keeps nothing from now on
        installing = true;
      }
    }
    unmap(evicted);
    if (installing) release_gae_output_cache();
  }

  bool installed() const { return installed_; }

  // {installed, max cached, cached now, live large blocks' bytes, hits, fresh maps}
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {installed_ ? 1 : 0, static_cast<int64_t>(max_cached_),
            static_cast<int64_t>(cached_), static_cast<int64_t>(live_bytes_),
            static_cast<int64_t>(hits_), static_cast<int64_t>(maps_)};
  }

 private:
  struct Free;
  using Lru = std::list<Free>;
  using BySize = std::multimap<size_t, Lru::iterator>;
  struct Free {
    void* ptr;
    size_t bytes;
    BySize::iterator index;
  };

  static size_t round_up(size_t n) {
    static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return (n + page - 1) / page * page;
  }

  void* take_cached(size_t bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    auto it = by_size_.lower_bound(bytes);
    void* ptr = nullptr;
    size_t got = 0;
    if (it != by_size_.end() && it->first <= bytes + bytes / 8) {
      ptr = it->second->ptr;
      got = it->first;
      cached_ -= got;
      lru_.erase(it->second);
      by_size_.erase(it);
      ++hits_;
      live_[ptr] = got;
      live_bytes_ += got;
    }
    return ptr;
  }

  void* map_fresh(size_t bytes) {
    void* ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ptr == MAP_FAILED) {  // give the cache back and try once more
      std::vector<Free> evicted;
      {
        std::lock_guard<std::mutex> guard(mutex_);
        const size_t cap = max_cached_;
        max_cached_ = 0;
        evict_over_cap(&evicted);
        max_cached_ = cap;
      }
      unmap(evicted);
      ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    if (ptr == MAP_FAILED) {
      c10::profiledCPUMemoryReporter().OutOfMemory(bytes);
      TORCH_CHECK_WITH(OutOfMemoryError, false, "rlhf_kernels CPU block cache: not enough "
                       "memory: you tried to allocate ", bytes, " bytes.");
    }
    std::lock_guard<std::mutex> guard(mutex_);
    ++maps_;
    live_[ptr] = bytes;
    live_bytes_ += bytes;
    return ptr;
  }

  static void free_small(void* ptr) {
    if (ptr == nullptr) return;
    c10::profiledCPUMemoryReporter().Delete(ptr);
    c10::free_cpu(ptr);
  }

  static void release(void* ptr) {
    if (ptr == nullptr) return;
    c10::profiledCPUMemoryReporter().Delete(ptr);
    get().give_back(ptr);
  }

  // raw_deallocate: either kind of block
  static void release_any(void* ptr) {
    if (ptr == nullptr) return;
    if (!get().owns(ptr)) {
      free_small(ptr);
      return;
    }
    release(ptr);
  }

  bool owns(void* ptr) {
    std::lock_guard<std::mutex> guard(mutex_);
    return live_.count(ptr) != 0;
  }

  void give_back(void* ptr) {
    std::vector<Free> evicted;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto found = live_.find(ptr);
      TORCH_INTERNAL_ASSERT(found != live_.end(), "rlhf_kernels CPU block cache: freeing a "
                            "block it did not allocate");
      const size_t bytes = found->second;
      live_.erase(found);
      live_bytes_ -= bytes;
      if (bytes > max_cached_) {
        evicted.push_back(Free{ptr, bytes, {}});
      } else {
        auto pos = lru_.insert(lru_.end(), Free{ptr, bytes, {}});
        pos->index = by_size_.emplace(bytes, pos);
        cached_ += bytes;
        evict_over_cap(&evicted);
      }
    }
    unmap(evicted);
  }

  // under the lock: the oldest cached blocks out until the cap holds
  void evict_over_cap(std::vector<Free>* evicted) {
    while (cached_ > max_cached_ && !lru_.empty()) {
      Free& oldest = lru_.front();
      cached_ -= oldest.bytes;
      by_size_.erase(oldest.index);
      evicted->push_back(oldest);
      lru_.pop_front();
    }
  }

  static void unmap(const std::vector<Free>& blocks) {
    for (const Free& block : blocks) munmap(block.ptr, block.bytes);
  }

  std::mutex mutex_;
  Lru lru_;  // cached blocks, oldest first
  BySize by_size_;
  std::unordered_map<void*, size_t> live_;  // large blocks handed out -> mapped bytes
  size_t max_cached_ = 0, cached_ = 0, live_bytes_ = 0, hits_ = 0, maps_ = 0;
  std::atomic<bool> installed_{false};  // read without the lock by cpu_block_cache_installed
};

}  // namespace

// registered as ops in register.cpp
std::vector<int64_t> cpu_block_cache(int64_t max_cached_bytes) {
  TORCH_CHECK(max_cached_bytes >= 0, "rlhf_kernels_native: cpu_block_cache takes a byte cap "
              ">= 0, got ", max_cached_bytes);
  BlockCache::get().configure(static_cast<size_t>(max_cached_bytes));
  return BlockCache::get().stats();
}

std::vector<int64_t> cpu_block_cache_stats() { return BlockCache::get().stats(); }

bool cpu_block_cache_installed() { return BlockCache::get().installed(); }

}  // namespace rlhf_native
