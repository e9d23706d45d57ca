/* The machine's floating-point peak: THREADS threads each run independent chains of float32 vector fused
 * multiply-adds in the widest vectors the compiler targets (-march=native), for SECONDS. Prints one JSON line:
 * {"vector_bytes": W, "fused": 0|1, "chains": C, "threads": N, "per_thread_gflops": [...], "gflops": sum,
 *  "sustained_gflops": sum of each thread's average}.
 *
 * A thread's rate is that of its fastest block of BLOCK iterations (~0.2 ms), as a model's time is its fastest
 * run: a process sharing the core halves the average (84-89 instead of 184 GFLOP/s on 2 cores beside two busy
 * loops) and leaves the fastest block as it is quiet.
 *
 * Nothing else is in the loop (no loads, no stores, no spills): each chain depends only on itself, and there are
 * more chains than the FMA pipes times their latency, so the pipes are the limit. fma_peak.py compiles and runs it.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#if defined(__AVX512F__)
#define CHAINS 16 /* 32 registers; 2 pipes x latency 4 need 8 */
#ifndef VECTOR_BYTES /* -DVECTOR_BYTES=32: the rate of half-width vectors (fma_peak.wide_vector_speedup) */
#define VECTOR_BYTES 64
#endif
#elif defined(__AVX__)
#define VECTOR_BYTES 32
#define CHAINS 12 /* 16 registers, two hold the constants */
#else
#define VECTOR_BYTES 16
#define CHAINS 24 /* NEON: 32 registers; up to 4 pipes x latency 4 */
#endif
#define LANES (VECTOR_BYTES / 4)
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define FUSED 1
#else
#define FUSED 0 /* a multiply and an add per lane: not the machine's peak (compiled without -march=native?) */
#endif
#define BLOCK 100000 /* iterations between clock reads */

typedef float vec __attribute__((vector_size(VECTOR_BYTES)));

static double seconds = 0.3;
static double gflops[256], sustained[256];
static pthread_barrier_t start;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void* chains(void* arg) {
  long id = (long)arg;
  vec acc[CHAINS], mul, add;
  for (int l = 0; l < LANES; ++l) {
    mul[l] = 0.99999f; /* a = a * mul + add converges to add / (1 - mul): no overflow, no denormals */
    add[l] = 1e-7f;
    for (int c = 0; c < CHAINS; ++c) acc[c][l] = 1e-3f * (c + 1);
  }
  pthread_barrier_wait(&start);
  double t0 = now(), last = t0, fastest = 1e30;
  long blocks = 0;
  do {
    for (long i = 0; i < BLOCK; ++i) {
#pragma GCC unroll 32
      for (int c = 0; c < CHAINS; ++c) acc[c] = acc[c] * mul + add;
    }
    ++blocks;
    double t = now();
    if (t - last < fastest) fastest = t - last;
    last = t;
  } while (last - t0 < seconds);
  vec sum = acc[0];
  for (int c = 1; c < CHAINS; ++c) sum += acc[c];
  float total = 0;
  for (int l = 0; l < LANES; ++l) total += sum[l];
  if (total < 0) printf("#"); /* keeps the chains live */
  double flops = 2.0 * LANES * CHAINS * BLOCK;
  gflops[id] = flops / fastest / 1e9;
  sustained[id] = flops * blocks / (last - t0) / 1e9;
  return NULL;
}

int main(int argc, char** argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  if (argc > 2) seconds = atof(argv[2]);
  if (threads < 1 || threads > 256 || seconds <= 0) {
    fprintf(stderr, "usage: fma_peak THREADS(1-256) [SECONDS]\n");
    return 2;
  }
  pthread_t ids[256];
  pthread_barrier_init(&start, NULL, threads);
  for (long i = 0; i < threads; ++i)
    if (pthread_create(&ids[i], NULL, chains, (void*)i) != 0) {
      fprintf(stderr, "fma_peak: cannot start thread %ld\n", i);
      return 1;
    }
  double sum = 0, sum_sustained = 0;
  printf("{\"vector_bytes\": %d, \"fused\": %d, \"chains\": %d, \"threads\": %d, \"per_thread_gflops\": [",
         VECTOR_BYTES, FUSED, CHAINS, threads);
  for (int i = 0; i < threads; ++i) {
    pthread_join(ids[i], NULL);
    sum += gflops[i];
    sum_sustained += sustained[i];
    printf("%s%.2f", i ? ", " : "", gflops[i]);
  }
  printf("], \"gflops\": %.2f, \"sustained_gflops\": %.2f}\n", sum, sum_sustained);
  return 0;
}
