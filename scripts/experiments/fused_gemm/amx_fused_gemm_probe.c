// What a fused kernel would save a short query: per-row int8 quantization, the int8 GEMM on AMX tiles
// and the output scales in ONE pass, timed on the shapes of scripts/int8_gemm_floor.py (72 GEMMs of
// [rows, 768] x [768, 1152], 64 MB of int8 weights), so the two print comparable figures.
//
// An experiment for BENCHMARKS.md, not part of the worker: the shipped graph runs these steps as
// separate ONNX Runtime nodes (Abs, ReduceMax, Max, Div, QuantizeLinear, MatMulIntegerToFloat, Mul),
// and this measures how much a custom op with its own kernel could take off them. CPUs with AMX-INT8
// only (Linux >= 5.16 grants the tile state on request).
//
//   gcc -O3 -march=sapphirerapids -o /tmp/amx_probe scripts/experiments/fused_gemm/amx_fused_gemm_probe.c -lm
//   /tmp/amx_probe 16 [72]   # rows [GEMMs]; prints a check against a scalar reference, then the median CPU time
//   (120 GEMMs = 106 MB, EmbeddingGemma-300m's int8 weights: too many to stay in cache between runs)
//
// Layout: the weights are packed once, as a custom op would at session start, into AMX's B layout
// (per 16-column block and 64-deep k step: 16 rows of k/4 x 64 bytes = 16 columns x 4 k values).
// Activations are u8 with zero point 128 (as the shipped recipe); the zero point is removed with
// precomputed column sums.
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

#define K 768
#define N 1152
#define NB 4  // C tiles (16 columns each) per pass

typedef struct { uint8_t palette; uint8_t start_row; uint8_t rsv[14]; uint16_t colsb[16]; uint8_t rows[16]; } tilecfg;

static double cpu_ms(void) { struct timespec t; clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t); return t.tv_sec * 1e3 + t.tv_nsec / 1e6; }

// B packed for AMX: for each 16-column block j, for each 64-deep k step: 16 rows (k/4) x 64 bytes (16 cols x 4 k)
static void pack_b(const int8_t *w, int8_t *bp) {
  for (int j = 0; j < N / 16; j++)
    for (int ks = 0; ks < K / 64; ks++)
      for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++)
          for (int q = 0; q < 4; q++)
            bp[((((size_t)j * (K / 64) + ks) * 16 + r) * 16 + c) * 4 + q] = w[(size_t)(ks * 64 + r * 4 + q) * N + j * 16 + c];
}


// x: [M][K] fp32 -> y: [M][N] fp32. Per-row absmax quantization to u8 (zp 128), AMX u8 x s8, scales fused.
static void fused(int M, const float *x, const int8_t *bp, const float *wscale, const int32_t *cs, float *y) {
  uint8_t a[16 * K] __attribute__((aligned(64)));
  float rs[16];
  for (int m = 0; m < M; m++) {
    const float *xr = x + (size_t)m * K;
    __m512 mx = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
    float amax = fmaxf(_mm512_reduce_max_ps(mx), 1e-10f);
    rs[m] = amax / 127.f;
    __m512 inv = _mm512_set1_ps(127.f / amax);
    for (int k = 0; k < K; k += 16) {
      __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), inv)), _mm512_set1_epi32(128));
      _mm_storeu_si128((__m128i *)(a + m * K + k), _mm512_cvtusepi32_epi8(q));
    }
  }
  if (M < 16) memset(a + M * K, 128, (16 - M) * K);
  int32_t c[NB][16 * 16] __attribute__((aligned(64)));
  for (int j0 = 0; j0 < N / 16; j0 += NB) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int ks = 0; ks < K / 64; ks++) {
      _tile_loadd(4, a + ks * 64, K);
      const int8_t *b = bp + (((size_t)j0 * (K / 64) + ks) * 1024);
      const size_t jstride = (size_t)(K / 64) * 1024;
      _tile_loadd(5, b, 64); _tile_dpbusd(0, 4, 5);
      _tile_loadd(6, b + jstride, 64); _tile_dpbusd(1, 4, 6);
      _tile_loadd(7, b + 2 * jstride, 64); _tile_dpbusd(2, 4, 7);
      _tile_loadd(5, b + 3 * jstride, 64); _tile_dpbusd(3, 4, 5);
    }
    _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64); _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
    for (int t = 0; t < NB; t++) {
      int col = (j0 + t) * 16;
      __m512 ws = _mm512_loadu_ps(wscale + col);
      __m512i zs = _mm512_mullo_epi32(_mm512_loadu_si512(cs + col), _mm512_set1_epi32(128));
      for (int m = 0; m < M; m++) {
        __m512i acc = _mm512_sub_epi32(_mm512_load_si512(c[t] + m * 16), zs);
        _mm512_storeu_ps(y + (size_t)m * N + col, _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(ws, _mm512_set1_ps(rs[m]))));
      }
    }
  }
}

int main(int argc, char **argv) {
  int M = argc > 1 ? atoi(argv[1]) : 16;
  int L = argc > 2 ? atoi(argv[2]) : 72;
  if (M < 1 || M > 16 || L < 1) { fprintf(stderr, "usage: amx_probe ROWS(1-16) [GEMMS]\n"); return 2; }
  if (!__builtin_cpu_supports("amx-int8")) { fprintf(stderr, "this CPU has no AMX-INT8\n"); return 2; }
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */)) {
    perror("arch_prctl(ARCH_REQ_XCOMP_PERM)");
    return 2;
  }
  tilecfg cfg = {0}; cfg.palette = 1;
  for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
  srand(1);
  int8_t *w = malloc((size_t)K * N);
  int8_t **bp = malloc(L * sizeof(*bp));
  int32_t (*colsum)[N] = malloc(sizeof(int32_t[N]) * L);
  float *wscale = malloc(N * sizeof(float));
  for (int n = 0; n < N; n++) wscale[n] = 0.01f;
  for (int l = 0; l < L; l++) {
    for (size_t i = 0; i < (size_t)K * N; i++) w[i] = (int8_t)(rand() % 255 - 127);
    for (int n = 0; n < N; n++) { int32_t s = 0; for (int k = 0; k < K; k++) s += w[(size_t)k * N + n]; colsum[l][n] = s; }
    bp[l] = aligned_alloc(64, (size_t)K * N);
    pack_b(w, bp[l]);
    if (l == 0) {  // check layer 0 against a plain reference on random rows
      float x[16 * K], y[16 * N];
      for (int i = 0; i < 16 * K; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
      fused(M, x, bp[0], wscale, colsum[0], y);
      double worst = 0;
      for (int m = 0; m < M; m++) {
        float amax = 0; for (int k = 0; k < K; k++) amax = fmaxf(amax, fabsf(x[m * K + k]));
        for (int n = 0; n < N; n += 37) {
          long s = 0; for (int k = 0; k < K; k++) s += (long)lrintf(x[m * K + k] * 127.f / amax) * w[(size_t)k * N + n];
          double ref = s * (amax / 127.f) * 0.01;
          worst = fmax(worst, fabs(ref - y[m * N + n]));
        }
      }
      printf("check vs reference: max abs diff %.3g\n", worst);
    }
  }
  float *x = malloc(16 * K * sizeof(float)), *y = malloc(16 * N * sizeof(float));
  for (int i = 0; i < 16 * K; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
  double best[9]; int nrep = 9;
  for (int r = 0; r < nrep + 1; r++) {
    double t0 = cpu_ms();
    for (int l = 0; l < L; l++) fused(M, x, bp[l], wscale, colsum[l], y);
    if (r) best[r - 1] = cpu_ms() - t0;
  }
  for (int i = 0; i < nrep; i++) for (int j = i + 1; j < nrep; j++) if (best[j] < best[i]) { double t = best[i]; best[i] = best[j]; best[j] = t; }
  printf("rows %2d: %.2f ms median for %d fused quantize + AMX GEMM + scale of 768x1152 (%.0f MB int8)\n", M, best[nrep / 2], L, L * (double)K * N / 1e6);
  _tile_release();
  return 0;
}
