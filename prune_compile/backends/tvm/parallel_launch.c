/* A parallel launcher for TVM-generated CPU code, linked into the libraries `build` exports for the cpu and arm
 * targets and installed by `load_library` (see parallel_launcher.py for why and what it measured).
 *
 * TVM's own launcher gives each thread one static share of a parallel loop and returns when every share is done,
 * so a kernel waits for any thread that has not started: when another process holds a core for a moment, every
 * kernel launched meanwhile waits for it. Here each thread starts on its own share (the same split, so in a quiet
 * machine every core computes the same rows kernel after kernel, as with TVM's launcher), a thread with nothing
 * left takes the shares no thread has started, and the caller waits only for shares already started.
 *
 * Written in the common subset of C and C++: `export_library` compiles it with the default compiler, g++ on x86, and
 * with the aarch64 cross compiler (as C) for arm libraries.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifdef __cplusplus
extern "C" {
#endif

/* TVM's ABI for parallel lambdas (tvm/runtime/c_backend_api.h) */
typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

int prune_compile_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task);
int prune_compile_parallel_threads(void);
uint64_t prune_compile_parallel_launches(void);

/* tvm-ffi's value cell (TVMFFIAny, tvm/ffi/c_api.h) as far as an int result needs it */
typedef struct {
  int32_t type_index;
  uint32_t zero_padding;
  int64_t v_int64;
} FFIAny;
#define FFI_INT 1 /* kTVMFFIInt */
/* Functions a loaded library offers by name (`module["prune_compile_install_launcher"]`), also over TVM's RPC, where
 * the board's server loads the library and nothing of ours runs in that process. */
int __tvm_ffi_prune_compile_install_launcher(void* self, const FFIAny* args, int32_t num_args, FFIAny* result);
int __tvm_ffi_prune_compile_parallel_launches(void* self, const FFIAny* args, int32_t num_args, FFIAny* result);
int __tvm_ffi_prune_compile_quiet_tvm_pool(void* self, const FFIAny* args, int32_t num_args, FFIAny* result);

#ifdef __cplusplus
}
#endif

#define MAX_THREADS 256
/* Shares per thread. More would balance finer, but each share of a generated kernel allocates its own workspace and
 * re-pads its halo rows: 4 per thread ran pruned resnet18 8-14% slower on a quiet machine (Zen 5, 2 threads). */
#define SHARES_PER_THREAD 1
/* pause rounds a worker spins before it sleeps (the gap between two kernels of a model is a few microseconds) */
#define SPIN_ROUNDS 20000

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

/* A thread's range of shares, [next, end) packed in one word so that a claim is one compare-and-swap. The caller
 * empties every range before it writes the next job, so a claim that succeeds is of a share of the current job. */
typedef struct {
  uint64_t word __attribute__((aligned(64)));
} Range;
#define PACK(next, end) (((uint64_t)(next) << 32) | (uint64_t)(end))
#define NEXT(w) ((uint32_t)((w) >> 32))
#define END(w) ((uint32_t)(w))

static int threads;
static Range ranges[MAX_THREADS];
static FTVMParallelLambda job_fn;
static void* job_data;
static int32_t job_shares;
static int job_done __attribute__((aligned(64)));
static int job_error;
static uint32_t generation __attribute__((aligned(64))); /* bumped per job; idle workers sleep on it */
static int sleepers;
static int busy; /* a job is running: a launch from another application thread runs serially instead */
static uint64_t launches; /* launches so far, serial ones included: shows that generated code calls this launcher */
static pthread_once_t once = PTHREAD_ONCE_INIT;
static __thread int inside; /* a worker, or the caller during its job: nested launches run serially */

static long futex(uint32_t* addr, int op, uint32_t val) {
  return syscall(SYS_futex, addr, op, val, NULL, NULL, 0);
}

static int claim(int owner) {
  uint64_t w = __atomic_load_n(&ranges[owner].word, __ATOMIC_ACQUIRE);
  while (NEXT(w) < END(w)) {
    if (__atomic_compare_exchange_n(&ranges[owner].word, &w, w + (1ull << 32), 0, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE))
      return (int)NEXT(w);
  }
  return -1;
}

static void run_job(int self) {
  for (int k = 0; k < threads; ++k) { /* its own range first, then the others' unstarted shares */
    int share;
    while ((share = claim((self + k) % threads)) >= 0) {
      TVMParallelGroupEnv env = {NULL, job_shares};
      if (job_fn(share, &env, job_data) != 0) __atomic_store_n(&job_error, -1, __ATOMIC_RELAXED);
      __atomic_add_fetch(&job_done, 1, __ATOMIC_RELEASE);
    }
  }
}

static void* worker(void* arg) {
  int self = (int)(intptr_t)arg;
  uint32_t seen = 0;
  inside = 1;
  for (;;) {
    uint32_t now;
    for (int spin = 0; (now = __atomic_load_n(&generation, __ATOMIC_ACQUIRE)) == seen; ++spin) {
      if (spin < SPIN_ROUNDS) {
        CPU_RELAX();
        continue;
      }
      __atomic_add_fetch(&sleepers, 1, __ATOMIC_SEQ_CST);
      if (__atomic_load_n(&generation, __ATOMIC_SEQ_CST) == seen) futex(&generation, FUTEX_WAIT_PRIVATE, seen);
      __atomic_sub_fetch(&sleepers, 1, __ATOMIC_SEQ_CST);
      spin = 0;
    }
    seen = now;
    run_job(self);
  }
  return NULL;
}

/* TVM_NUM_THREADS (which load_library sets, as TVM's own pool reads it), else the cores this process may use */
static void start_pool(void) {
  const char* env = getenv("TVM_NUM_THREADS");
  cpu_set_t set;
  int cores = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
  threads = env && atoi(env) > 0 ? atoi(env) : cores;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (threads < 1) threads = 1;
  for (int i = 1; i < threads; ++i) {
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int failed = pthread_create(&t, &attr, worker, (void*)(intptr_t)i);
    pthread_attr_destroy(&attr);
    if (failed) { /* fewer threads: the shares of the missing ones are taken by the others */
      threads = i;
      break;
    }
  }
}

int prune_compile_parallel_threads(void) {
  pthread_once(&once, start_pool);
  return threads;
}

uint64_t prune_compile_parallel_launches(void) { return __atomic_load_n(&launches, __ATOMIC_RELAXED); }

/* The launcher pointer of the TVM-generated code in the library this file is linked into (TVM sets it to its own
 * launcher when it loads the library), and TVM's barrier, whose thread groups our launcher does not create. Weak:
 * absent in a library without parallel loops, and in the launcher compiled on its own. */
extern void* __TVMBackendParallelLaunch __attribute__((weak));
extern void* __TVMBackendParallelBarrier __attribute__((weak));

/* Points this library's parallel loops at our launcher (what load_library does from Python). Returns 1, or 0 with
 * TVM's launcher left in place when the library has no parallel loops or synchronizes with TVM's barrier. */
int __tvm_ffi_prune_compile_install_launcher(void* self, const FFIAny* args, int32_t num_args, FFIAny* result) {
  (void)self, (void)args, (void)num_args;
  int ok = &__TVMBackendParallelLaunch != NULL && &__TVMBackendParallelBarrier == NULL;
  if (ok) __TVMBackendParallelLaunch = (void*)prune_compile_parallel_launch;
  result->type_index = FFI_INT;
  result->zero_padding = 0;
  result->v_int64 = ok;
  return 0;
}

int __tvm_ffi_prune_compile_parallel_launches(void* self, const FFIAny* args, int32_t num_args, FFIAny* result) {
  (void)self, (void)args, (void)num_args;
  result->type_index = FFI_INT;
  result->zero_padding = 0;
  result->v_int64 = (int64_t)prune_compile_parallel_launches();
  return 0;
}

/* Keeps TVM's own thread pool in this process from spinning after its work (tuning's runner calls it on a board before
 * MetaSchedule's random fill of the candidate's arguments, the pool's only work there): TVM's workers read
 * TVM_THREAD_POOL_SPIN_COUNT once, when the pool first runs. Spinning, they held the cores for tens of milliseconds
 * after the fill, and one candidate in three ran its first calls up to 4x slow. Returns the count TVM would have
 * read before (-1: none set). */
int __tvm_ffi_prune_compile_quiet_tvm_pool(void* self, const FFIAny* args, int32_t num_args, FFIAny* result) {
  (void)self, (void)args, (void)num_args;
  const char* before = getenv("TVM_THREAD_POOL_SPIN_COUNT");
  result->type_index = FFI_INT;
  result->zero_padding = 0;
  result->v_int64 = before ? atoll(before) : -1;
  setenv("TVM_THREAD_POOL_SPIN_COUNT", "0", 1);
  return 0;
}

int prune_compile_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  pthread_once(&once, start_pool);
  __atomic_add_fetch(&launches, 1, __ATOMIC_RELAXED);
  int expected = 0;
  if (inside || threads == 1 ||
      !__atomic_compare_exchange_n(&busy, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
    TVMParallelGroupEnv env = {NULL, 1};
    return flambda(0, &env, cdata);
  }
  int shares = num_task > 0 ? num_task : threads * SHARES_PER_THREAD;
  for (int t = 0; t < threads; ++t) __atomic_store_n(&ranges[t].word, PACK(0, 0), __ATOMIC_SEQ_CST);
  job_fn = flambda;
  job_data = cdata;
  job_shares = shares;
  __atomic_store_n(&job_done, 0, __ATOMIC_SEQ_CST);
  __atomic_store_n(&job_error, 0, __ATOMIC_SEQ_CST);
  for (int t = 0; t < threads; ++t)
    __atomic_store_n(&ranges[t].word,
                     PACK((int64_t)shares * t / threads, (int64_t)shares * (t + 1) / threads), __ATOMIC_SEQ_CST);
  __atomic_add_fetch(&generation, 1, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&sleepers, __ATOMIC_SEQ_CST) > 0) futex(&generation, FUTEX_WAKE_PRIVATE, INT32_MAX);
  inside = 1;
  run_job(0);
  inside = 0;
  /* what is left are shares other threads started: wait for those only */
  for (int spin = 0; __atomic_load_n(&job_done, __ATOMIC_ACQUIRE) < shares; ++spin) {
    if (spin < SPIN_ROUNDS)
      CPU_RELAX();
    else
      sched_yield();
  }
  int error = __atomic_load_n(&job_error, __ATOMIC_RELAXED);
  __atomic_store_n(&busy, 0, __ATOMIC_RELEASE);
  return error;
}
