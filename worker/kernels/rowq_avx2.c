// The fused op's AVX2 path, for x86 CPUs without AVX-512 VNNI or AMX (the Zen 3 class). Its own
// translation unit whose target pragma names AVX2 and FMA only, so nothing in it can use an AVX-512
// instruction such a CPU lacks (setup.py compiles every file with the same baseline flags).
//
// Same inputs, same packed weights and, by construction, the same output bits as rowq_kernels.h:
//   - quantization: the same codes (max of |x| is exact in any order; the same scalar 127 / amax; the
//     same round-to-nearest-even conversion), and the rotation's butterflies in the same order with
//     the same single roundings (x[j] +- x[j ^ h]);
//   - GEMM: AVX2's u8 x s8 multiply (vpmaddubsw) saturates its int16 pair sums, so it runs on signed
//     codes instead: vpsignb moves each weight's sign onto the activation and vpabsb takes |w|, so a
//     pair is at most 2 x 128 x 127 and fits; the int32 sums then equal the VNNI path's
//     sum((q + 128) w) - 128 colsum exactly;
//   - epilogue: the same expression, 8 lanes at a time, and 2^n built in the exponent field where
//     AVX-512 uses vscalefps (both exact for the normal range the clamp keeps).
#pragma GCC target("avx2,fma")
#include "rowq.h"
#include "rowq_poly.h"
#include <immintrin.h>
#include <math.h>
#include <string.h>

// The rotation: stages h = 1, 2, 4 inside a register, 8 across the 16-lane halves, 16 across the
// block's halves with the 1 / sqrt(32) scale, as rowq_rotate32 does.
static inline __m256 butterfly_in(__m256 x, __m256 sign, int h) {
  const __m256 partner = h == 1 ? _mm256_permute_ps(x, 0xB1) : h == 2 ? _mm256_permute_ps(x, 0x4E)
                                                                      : _mm256_permute2f128_ps(x, x, 1);
  return _mm256_fmadd_ps(sign, x, partner);
}

static void rotate32(float *v, int64_t K) {
  const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1), s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  const __m256 scale = _mm256_set1_ps(0.17677669529663687f);
  for (int64_t k = 0; k < K; k += 32) {
    __m256 x[4];
    for (int i = 0; i < 4; i++) {
      x[i] = _mm256_loadu_ps(v + k + 8 * i);
      x[i] = butterfly_in(x[i], s1, 1);
      x[i] = butterfly_in(x[i], s2, 2);
      x[i] = butterfly_in(x[i], s4, 4);
    }
    // h = 8: lanes j < 8 get x[j + 8] + x[j], lanes j >= 8 get x[j - 8] - x[j]
    const __m256 a0 = _mm256_add_ps(x[1], x[0]), b0 = _mm256_sub_ps(x[0], x[1]);
    const __m256 a1 = _mm256_add_ps(x[3], x[2]), b1 = _mm256_sub_ps(x[2], x[3]);
    _mm256_storeu_ps(v + k, _mm256_mul_ps(_mm256_add_ps(a0, a1), scale));
    _mm256_storeu_ps(v + k + 8, _mm256_mul_ps(_mm256_add_ps(b0, b1), scale));
    _mm256_storeu_ps(v + k + 16, _mm256_mul_ps(_mm256_sub_ps(a0, a1), scale));
    _mm256_storeu_ps(v + k + 24, _mm256_mul_ps(_mm256_sub_ps(b0, b1), scale));
  }
}

float rowq_avx2_quantize_row(const float *x, int64_t K, int rotate, float *scratch, uint8_t *a) {
  if (rotate) {
    memcpy(scratch, x, (size_t)K * sizeof(float));
    rotate32(scratch, K);
    x = scratch;
  }
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
  float lanes[8];
  _mm256_storeu_ps(lanes, mx);
  float amax = lanes[0];
  for (int i = 1; i < 8; i++) amax = fmaxf(amax, lanes[i]);
  amax = fmaxf(amax, 1e-10f * 127.f);
  const __m256 inv = _mm256_set1_ps(127.f / amax);
  const __m256i zero_point = _mm256_set1_epi32(128), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t k = 0; k < K; k += 32) {
    __m256i q[4];
    for (int i = 0; i < 4; i++)
      q[i] = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * i), inv)), zero_point);
    const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(q[0], q[1]), _mm256_packus_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i *)(a + k), _mm256_permutevar8x32_epi32(bytes, order));
  }
  return amax;
}

static inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(ROWQ_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(ROWQ_LN2_HI), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(ROWQ_LN2_LO), r);
  __m256 p = _mm256_set1_ps(rowq_exp_taylor[0]);
  for (int i = 1; i < 8; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(rowq_exp_taylor[i]));
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(p, two_n);  // = vscalefps(p, n) for the normal range the clamp keeps
}

static inline __m256 erf8(__m256 a) {
  const __m256 t = _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))), s = _mm256_mul_ps(a, a);
  __m256 small = _mm256_set1_ps(rowq_erf_small[0]);
  for (int i = 1; i < 6; i++) small = _mm256_fmadd_ps(small, s, _mm256_set1_ps(rowq_erf_small[i]));
  small = _mm256_fmadd_ps(small, a, a);
  __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(rowq_erf_big[0]), t, _mm256_set1_ps(rowq_erf_big[1]));
  r = _mm256_fmadd_ps(r, s, _mm256_fmadd_ps(_mm256_set1_ps(rowq_erf_big[2]), t, _mm256_set1_ps(rowq_erf_big[3])));
  for (int i = 4; i < 7; i++) r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(rowq_erf_big[i]));
  r = _mm256_fmadd_ps(r, t, _mm256_sub_ps(_mm256_setzero_ps(), t));
  r = _mm256_sub_ps(_mm256_set1_ps(1.f), exp_neg(r));
  const __m256 big = _mm256_or_ps(r, _mm256_and_ps(a, _mm256_set1_ps(-0.f)));
  return _mm256_blendv_ps(small, big, _mm256_cmp_ps(t, _mm256_set1_ps(0.927734375f), _CMP_GT_OQ));
}

static inline __m256 epilogue(__m256i acc, __m256 ws, float rs, int act, const float *bias) {
  __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(ws, _mm256_set1_ps(rs)));
  if (act == ROWQ_NONE) return y;
  y = _mm256_add_ps(y, _mm256_loadu_ps(bias));
  if (act == ROWQ_BIAS) return y;
  const __m256 e = erf8(_mm256_mul_ps(y, _mm256_set1_ps(0.70710678118654752f)));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), y), _mm256_add_ps(_mm256_set1_ps(1.f), e));
}

#define AVX2_ROWS 4  // 4 rows x 16 columns: 8 accumulators of the 16 ymm registers

// One column block (16 columns: two 8-column halves of each 64-byte weight vector), R <= 4 rows.
static void block(int R, const uint8_t *a, int64_t K, int64_t ld, const int8_t *bj, int64_t col, const float *wscale,
                  const float *rs, int act, const float *bias, float *out) {
  __m256i acc[AVX2_ROWS][2];
  for (int r = 0; r < AVX2_ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
  for (int64_t q = 0; q < K / 4; q++) {
    const __m256i w0 = _mm256_loadu_si256((const __m256i *)(bj + q * 64));
    const __m256i w1 = _mm256_loadu_si256((const __m256i *)(bj + q * 64 + 32));
    const __m256i m0 = _mm256_abs_epi8(w0), m1 = _mm256_abs_epi8(w1);
    for (int r = 0; r < R; r++) {
      int32_t quad;
      memcpy(&quad, a + r * K + 4 * q, 4);
      const __m256i codes = _mm256_xor_si256(_mm256_set1_epi32(quad), flip);  // u8 q + 128 -> s8 q
      const __m256i p0 = _mm256_maddubs_epi16(m0, _mm256_sign_epi8(codes, w0));
      const __m256i p1 = _mm256_maddubs_epi16(m1, _mm256_sign_epi8(codes, w1));
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p0, ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(p1, ones));
    }
  }
  for (int h = 0; h < 2; h++) {
    const __m256 ws = _mm256_loadu_ps(wscale + col + 8 * h);
    for (int r = 0; r < R; r++)
      _mm256_storeu_ps(out + r * ld + 8 * h, epilogue(acc[r][h], ws, rs[r], act, bias ? bias + col + 8 * h : NULL));
  }
}

void rowq_avx2_gemm(int64_t M, const uint8_t *a, int64_t K, int64_t N, const int8_t *b, const float *wscale,
                    const float *rs, int act, const float *bias, const rowq_out *out) {
  const size_t jstride = (size_t)K * 16;
  for (int64_t j = 0; j < N / 16; j++)
    for (int64_t m0 = 0; m0 < M; m0 += AVX2_ROWS) {
      const int R = M - m0 < AVX2_ROWS ? (int)(M - m0) : AVX2_ROWS;
      block(R, a + m0 * K, K, out->ld[j / 4], b + j * jstride, j * 16, wscale, rs + m0, act, bias,
            rowq_out_at(out, j / 4, m0) + (j % 4) * 16);
    }
}

int rowq_avx2_run(int64_t M, const float *x, int64_t K, int64_t N, const int8_t *b, const float *wscale,
                  const float *bias, int act, int rotate, const rowq_out *out) {
  uint8_t *a = rowq_scratch(0, (uint64_t)M * K);
  float *rs = rowq_scratch(1, (uint64_t)M * sizeof(float));
  float *rotated = rowq_scratch(2, (uint64_t)K * sizeof(float));
  if (!a || !rs || !rotated) return -1;
  for (int64_t m = 0; m < M; m++) rs[m] = rowq_avx2_quantize_row(x + m * K, K, rotate, rotated, a + m * K);
  rowq_avx2_gemm(M, a, K, N, b, wscale, rs, act, bias, out);
  return 0;
}
