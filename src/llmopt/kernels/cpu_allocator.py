"""A caching allocator for PyTorch's CPU tensors: one arena whose freed pages stay mapped and are reused best-fit
by later blocks of any size, so a training step with variable shapes neither faults in fresh pages every step
nor keeps odd-sized free blocks resident.

PyTorch's CPU tensors come from the system malloc. With glibc, a large block is either its own mmap, unmapped
when freed (every step then faults in and zeroes its activations again: +34-64% CPU time per step measured on
the demo model with a fixed 256 KiB mmap threshold), or a heap block whose freed space stays resident and
fragments when the next batch has other shapes (0.87-0.95x of the default peak at best). The CUDA caching
allocator avoids both on a GPU by carving blocks out of large segments; this is the same idea for the CPU,
installed with `c10::SetCPUAllocator`:

- requests below `min_bytes` go to `posix_memalign` / `free` (the system allocator, as before);
- a larger request, rounded up to whole pages, is carved best-fit out of the free extents of one reserved
  address range (`MAP_NORESERVE`: reserving costs nothing until a page is written); freed blocks return as
  extents, merged with their free neighbours; with no fitting extent the used region grows at its top;
- pages below the arena's high-water mark stay mapped, so a reused range is never faulted in again: only a
  new high-water mark brings new pages, and in steady state a step maps none. `empty_cache()` gives the free
  pages back (`madvise(MADV_DONTNEED)`).

So the resident memory is the arena's high-water mark (the peak of the live bytes plus what fragmentation
leaves between them) plus the small blocks. Contents of a reused block are not zeroed (torch.empty's
contract). `stats()` counts requests, reuses, new pages and the high-water mark.

The C++ source is built at first use with the system C++ compiler against the installed torch's headers and
libc10 (a few seconds, cached like the C kernels). A missing compiler or headers raises ImportError, which
`available()` turns into False, and callers keep the system allocator.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from llmopt.kernels._cbuild import cached_build

_SOURCE = r"""
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <unordered_map>
#include <utility>

namespace {

struct Stats {
  long long requests, reused, extended, fallback, released;
  long long live_bytes, peak_live_bytes, touched_bytes, peak_touched_bytes, free_bytes, new_page_bytes, reserved_bytes;
};

// One reserved address range (MAP_NORESERVE: untouched pages cost nothing). Blocks are carved best-fit out of
// its free extents, which coalesce with their neighbours when freed; with no fitting extent the used region
// grows at its top. Pages below the high-water mark stay mapped and resident, so a reused range is never
// faulted in again: only a new high-water mark brings new pages.
class ArenaCPUAllocator final : public c10::Allocator {
 public:
  size_t min_bytes = 256 * 1024;
  c10::Allocator* previous = nullptr;
  char* base = nullptr;
  size_t reserve = 0, top = 0, high = 0;
  std::mutex mu;
  std::map<size_t, size_t> free_by_off;                 // offset -> size
  std::set<std::pair<size_t, size_t>> free_by_size;     // (size, offset)
  std::unordered_map<void*, size_t> live;               // block -> size (arena or own mapping)
  Stats st{};

  static void deleter(void* ptr);

  bool reserve_arena(size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    base = (char*)p; reserve = bytes; st.reserved_bytes = (long long)bytes;
    return true;
  }

  void add_free(size_t off, size_t size) {  // insert an extent, merged with its neighbours; lowers top
    auto next = free_by_off.lower_bound(off);
    if (next != free_by_off.end() && off + size == next->first) {
      free_by_size.erase({next->second, next->first});
      size += next->second;
      next = free_by_off.erase(next);
    }
    if (next != free_by_off.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == off) {
        free_by_size.erase({prev->second, prev->first});
        off = prev->first; size += prev->second;
        free_by_off.erase(prev);
      }
    }
    if (off + size == top) { top = off; return; }
    free_by_off[off] = size;
    free_by_size.insert({size, off});
  }

  void* take(size_t want) {  // the lock is held
    auto it = free_by_size.lower_bound({want, 0});
    if (it != free_by_size.end()) {
      size_t size = it->first, off = it->second;
      free_by_size.erase(it);
      free_by_off.erase(off);
      if (size > want) { free_by_off[off + want] = size - want; free_by_size.insert({size - want, off + want}); }
      st.reused++;
      return base + off;
    }
    if (top + want > reserve) return nullptr;
    size_t off = top;
    top += want;
    if (top > high) { st.new_page_bytes += top - high; high = top; }
    st.extended++;
    return base + off;
  }

  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    if (n < min_bytes) {
      if (n == 0) return c10::DataPtr(nullptr, nullptr, &deleter, c10::Device(c10::DeviceType::CPU));
      if (posix_memalign(&p, 64, n) != 0) throw std::bad_alloc();
      return c10::DataPtr(p, p, &deleter, c10::Device(c10::DeviceType::CPU));
    }
    const size_t page = 4096;
    size_t want = (n + page - 1) / page * page;
    std::lock_guard<std::mutex> g(mu);
    st.requests++;
    if (base != nullptr) p = take(want);
    if (p == nullptr) {  // no arena, or it is full: a mapping of its own
      void* q = mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (q == MAP_FAILED) throw std::bad_alloc();
      p = q; st.fallback++; st.new_page_bytes += want;
    }
    live[p] = want;
    st.live_bytes += want;
    if (st.live_bytes > st.peak_live_bytes) st.peak_live_bytes = st.live_bytes;
    st.touched_bytes = (long long)high;
    if (st.touched_bytes > st.peak_touched_bytes) st.peak_touched_bytes = st.touched_bytes;
    return c10::DataPtr(p, p, &deleter, c10::Device(c10::DeviceType::CPU));
  }

  void release(void* p) {
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = live.find(p);
      if (it != live.end()) {
        size_t size = it->second;
        live.erase(it);
        st.live_bytes -= size;
        char* c = (char*)p;
        if (base != nullptr && c >= base && c < base + reserve) add_free((size_t)(c - base), size);
        else { munmap(p, size); st.released++; }
        return;
      }
    }
    free(p);  // a small block (posix_memalign)
  }

  void empty_cache() {  // give the free pages back to the OS (the lock is held)
    for (auto& e : free_by_off) madvise(base + e.first, e.second, MADV_DONTNEED);
    if (high > top) madvise(base + top, high - top, MADV_DONTNEED);
    high = top;
    st.touched_bytes = (long long)high;
  }

  c10::DeleterFnPtr raw_deleter() const override { return &deleter; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count) std::memcpy(dest, src, count);
  }
};

ArenaCPUAllocator g_alloc;
bool g_installed = false;

void ArenaCPUAllocator::deleter(void* ptr) {
  if (ptr != nullptr) g_alloc.release(ptr);
}

}  // namespace

extern "C" {

// a fork (DataLoader workers) while another thread holds the lock would leave the child's copy locked forever
void fork_prepare() { g_alloc.mu.lock(); }
void fork_release() { g_alloc.mu.unlock(); }

int llmopt_cpu_alloc_install(size_t min_bytes, size_t reserve_bytes) {
  static bool at_fork = (pthread_atfork(fork_prepare, fork_release, fork_release), true);
  (void)at_fork;
  std::lock_guard<std::mutex> g(g_alloc.mu);
  g_alloc.min_bytes = min_bytes < 4096 ? 4096 : min_bytes;
  if (g_alloc.base == nullptr && reserve_bytes > 0) g_alloc.reserve_arena(reserve_bytes / 4096 * 4096);
  if (g_installed) return 0;
  g_alloc.previous = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&g_alloc, 200);
  g_installed = true;
  return 1;
}

int llmopt_cpu_alloc_uninstall(void) {
  std::lock_guard<std::mutex> g(g_alloc.mu);
  if (!g_installed) return 0;
  c10::SetCPUAllocator(g_alloc.previous, 200);  // blocks still alive keep our deleter, which stays loaded
  g_installed = false;
  return 1;
}

int llmopt_cpu_alloc_installed(void) { return g_installed && c10::GetCPUAllocator() == &g_alloc; }

void llmopt_cpu_alloc_empty_cache(void) {
  std::lock_guard<std::mutex> g(g_alloc.mu);
  if (g_alloc.base != nullptr) g_alloc.empty_cache();
}

void llmopt_cpu_alloc_stats(long long* out) {
  std::lock_guard<std::mutex> g(g_alloc.mu);
  g_alloc.st.free_bytes = 0;
  for (auto& e : g_alloc.free_by_off) g_alloc.st.free_bytes += (long long)e.second;
  std::memcpy(out, &g_alloc.st, sizeof(Stats));
}

void llmopt_cpu_alloc_reset_peaks(void) {
  std::lock_guard<std::mutex> g(g_alloc.mu);
  g_alloc.st.peak_live_bytes = g_alloc.st.live_bytes;
  g_alloc.st.peak_touched_bytes = g_alloc.st.touched_bytes;
}

}
"""

_STAT_FIELDS = ("requests", "reused", "extended", "fallback", "released", "live_bytes", "peak_live_bytes",
                "touched_bytes", "peak_touched_bytes", "free_bytes", "new_page_bytes", "reserved_bytes")


@dataclass(frozen=True)
class AllocatorStats:
    """Counters of the caching allocator since it was first installed (blocks of at least min_bytes only)."""

    requests: int
    reused: int
    """Requests served from a free extent of the arena (no system call, no new page)."""
    extended: int
    """Requests served by moving the arena's top up (new pages only above the high-water mark)."""
    fallback: int
    """Requests served by a mapping of their own (the arena was full)."""
    released: int
    live_bytes: int
    peak_live_bytes: int
    touched_bytes: int
    """The arena's high-water mark: its pages that are mapped and (once written) resident."""
    peak_touched_bytes: int
    free_bytes: int
    """Free extents below the arena's top (fragmentation, reusable by later requests)."""
    new_page_bytes: int
    """Bytes of pages touched for the first time (what the OS had to fault in and zero)."""
    reserved_bytes: int


def _torch_paths() -> tuple[Path, Path]:
    root = Path(torch.__file__).parent
    return root / "include", root / "lib"


@functools.cache
def _library() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    include, lib_dir = _torch_paths()
    if compiler is None:
        raise ImportError("the caching CPU allocator needs a C++ compiler (c++ or g++ on PATH, or $CXX); install g++, "
                          "or use buffer_reuse:allocator=system")
    if not (include / "c10" / "core" / "CPUAllocator.h").is_file():
        raise ImportError(f"the caching CPU allocator needs torch's C++ headers, not found under {include}; "
                          "use buffer_reuse:allocator=system")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O2", "-std=c++17", "-fPIC", "-shared", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{include}",
             f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}"]

    def build(tmp: Path, out: Path) -> None:
        src = tmp / "cpu_allocator.cpp"
        src.write_text(_SOURCE)
        done = subprocess.run([compiler, *flags, str(src), "-o", str(out), "-lc10"], capture_output=True, text=True)
        if done.returncode != 0:
            raise ImportError(f"building the caching CPU allocator with {compiler} failed: "
                              f"{done.stderr.strip().splitlines()[-1:]}; use buffer_reuse:allocator=system")

    lib = cached_build("cpu_allocator", [_SOURCE, compiler, *flags, torch.__version__], build)
    cdll = ctypes.CDLL(str(lib))
    cdll.llmopt_cpu_alloc_install.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    cdll.llmopt_cpu_alloc_stats.argtypes = [ctypes.POINTER(ctypes.c_longlong)]
    return cdll


def available() -> bool:
    """Whether the allocator builds and loads here (a C++ compiler and torch's headers)."""
    try:
        _library()
    except (ImportError, OSError):
        return False
    return True


def install(min_bytes: int = 256 * 1024, reserve_bytes: int | None = None) -> bool:
    """Make the caching allocator torch's CPU allocator for this process (tensors created from now on).
    `reserve_bytes`: the arena's address range (reserved, not committed; default half the physical memory,
    at most 64 GiB; blocks beyond it get mappings of their own). Returns False if it was already installed
    (`min_bytes` is updated; the arena stays). Raises ImportError where it cannot build."""
    if min_bytes < 0 or (reserve_bytes is not None and reserve_bytes < 0):
        raise ValueError(f"min_bytes and reserve_bytes must be >= 0, got {min_bytes}, {reserve_bytes}")
    if reserve_bytes is None:
        try:
            physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            physical = 8 << 30
        reserve_bytes = min(physical // 2, 64 << 30)
    return bool(_library().llmopt_cpu_alloc_install(min_bytes, reserve_bytes))


def uninstall() -> bool:
    """Give torch back the allocator it had before `install`; blocks still alive are freed by this one later."""
    if not available():
        return False
    return bool(_library().llmopt_cpu_alloc_uninstall())


def installed() -> bool:
    """Whether torch's CPU allocator is this one now."""
    return available() and bool(_library().llmopt_cpu_alloc_installed())


def empty_cache() -> None:
    """Give the pages of free extents and of the arena above its top back to the OS (they fault in again on
    their next use)."""
    if available():
        _library().llmopt_cpu_alloc_empty_cache()


def reset_peak_stats() -> None:
    """Set the peak counters to the current values."""
    if available():
        _library().llmopt_cpu_alloc_reset_peaks()


def stats() -> AllocatorStats:
    """The allocator's counters (all zero if it was never installed)."""
    out = (ctypes.c_longlong * len(_STAT_FIELDS))()
    if available():
        _library().llmopt_cpu_alloc_stats(out)
    return AllocatorStats(*(int(v) for v in out))


__all__ = ["AllocatorStats", "available", "empty_cache", "install", "installed", "reset_peak_stats", "stats",
           "uninstall"]
