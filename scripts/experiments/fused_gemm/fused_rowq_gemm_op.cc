// Experiment (not shipped): ONNX Runtime custom op "FusedRowQGemm" (domain deposium.experiment) =
// per-row absmax quantization to u8 + AMX int8 GEMM + zero-point correction + row x column scales, in
// place of the shipped recipe's Abs/ReduceMax/Max/Div/QuantizeLinear/MatMulIntegerToFloat/Mul chain.
// Inputs: x fp32 [..., K], b int8 in AMX's B layout (fused_op.py: amx_layout), w_scale fp32 [N] (the
// shipped graph's column steps, 1/127 included), colsum int32 [N]. Output fp32 [..., N]. K and N must be
// multiples of 64. "FusedRotRowQGemm" first rotates each row by the block-32 Hadamard matrix, in place
// of the graph's Reshape/MatMul/Reshape (fused_op.py rewrite --rotation). AMX-INT8 CPUs only: no AVX-512 or AVX2 path, which a shipped op would need.
//
// Build (headers: see README.md beside this file):
//   g++ -O3 -march=sapphirerapids -std=c++17 -fPIC -shared -I$ORT_INCLUDE -o /tmp/libfused_rowq_gemm.so
//       scripts/experiments/fused_gemm/fused_rowq_gemm_op.cc
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"
#include <immintrin.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <cmath>
#include <cstring>
#include <vector>
#include <memory>

struct TileCfg { uint8_t palette; uint8_t start_row; uint8_t rsv[14]; uint16_t colsb[16]; uint8_t rows[16]; };

static void load_tiles() {  // every call: MLAS's own AMX kernels load other configurations
  TileCfg cfg{}; cfg.palette = 1;
  for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
}

// x H over each 32-wide block, H the orthonormal Sylvester-Hadamard matrix (convert/rotate.py): the
// five butterfly stages of a fast Walsh-Hadamard transform, four inside a 16-lane register
// (partner lane j ^ h: y = x[j ^ h] + sign * x[j]), the last across the block's two halves.
struct ButterflyTables {  // per in-register stage s: partner lane j ^ 2^s and the sign of x[j]
  alignas(64) int32_t partner[4][16];
  alignas(64) float sign[4][16];
  ButterflyTables() {
    for (int s = 0; s < 4; s++)
      for (int j = 0; j < 16; j++) { partner[s][j] = j ^ (1 << s); sign[s][j] = (j & (1 << s)) ? -1.f : 1.f; }
  }
};

static void rotate32(float* v, int64_t K) {
  static const ButterflyTables tables;  // built once, not per row
  const __m512 scale = _mm512_set1_ps(0.17677669529663687f);  // 1 / sqrt(32)
  __m512i idx[4];
  __m512 sign[4];
  for (int s = 0; s < 4; s++) {
    idx[s] = _mm512_load_si512(tables.partner[s]);
    sign[s] = _mm512_load_ps(tables.sign[s]);
  }
  for (int64_t k = 0; k < K; k += 32) {
    __m512 lo = _mm512_loadu_ps(v + k), hi = _mm512_loadu_ps(v + k + 16);
    for (int s = 0; s < 4; s++) {
      lo = _mm512_fmadd_ps(sign[s], lo, _mm512_permutexvar_ps(idx[s], lo));
      hi = _mm512_fmadd_ps(sign[s], hi, _mm512_permutexvar_ps(idx[s], hi));
    }
    _mm512_storeu_ps(v + k, _mm512_mul_ps(_mm512_add_ps(lo, hi), scale));
    _mm512_storeu_ps(v + k + 16, _mm512_mul_ps(_mm512_sub_ps(lo, hi), scale));
  }
}

template <bool kRotate>
void RowQGemm(const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<int8_t>& b,
              const Ort::Custom::Tensor<float>& ws, const Ort::Custom::Tensor<int32_t>& cs,
              Ort::Custom::Tensor<float>& y) {
  std::vector<int64_t> shape = x.Shape();
  const int64_t K = shape.back(), N = ws.NumberOfElement(), M = x.NumberOfElement() / K;
  shape.back() = N;
  float* out = y.Allocate(shape);
  const float* xin = x.Data();
  const int8_t* bp = b.Data();
  const float* wscale = ws.Data();
  const int32_t* colsum = cs.Data();
  load_tiles();
  static thread_local std::vector<uint8_t> a;
  a.resize(16 * K);
  alignas(64) int32_t c[4][256];
  const size_t jstride = (size_t)(K / 64) * 1024;
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    const int rows = (int)std::min<int64_t>(16, M - m0);
    float rs[16];
    static thread_local std::vector<float> turned;
    if (kRotate) turned.resize(K);
    for (int m = 0; m < rows; m++) {
      const float* xr = xin + (m0 + m) * K;
      if (kRotate) {
        std::memcpy(turned.data(), xr, K * sizeof(float));
        rotate32(turned.data(), K);
        xr = turned.data();
      }
      __m512 mx = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
      const float amax = std::fmax(_mm512_reduce_max_ps(mx), 1e-10f * 127.f);
      rs[m] = amax;
      const __m512 inv = _mm512_set1_ps(127.f / amax);
      for (int64_t k = 0; k < K; k += 16) {
        __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), inv)), _mm512_set1_epi32(128));
        _mm_storeu_si128((__m128i*)(a.data() + m * K + k), _mm512_cvtusepi32_epi8(q));
      }
    }
    if (rows < 16) std::memset(a.data() + rows * K, 128, (16 - rows) * K);
    for (int64_t j0 = 0; j0 < N / 16; j0 += 4) {
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int64_t ks = 0; ks < K / 64; ks++) {
        _tile_loadd(4, a.data() + ks * 64, K);
        const int8_t* bb = bp + ((size_t)j0 * (K / 64) + ks) * 1024;
        _tile_loadd(5, bb, 64); _tile_dpbusd(0, 4, 5);
        _tile_loadd(6, bb + jstride, 64); _tile_dpbusd(1, 4, 6);
        _tile_loadd(7, bb + 2 * jstride, 64); _tile_dpbusd(2, 4, 7);
        _tile_loadd(5, bb + 3 * jstride, 64); _tile_dpbusd(3, 4, 5);
      }
      _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64); _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
      for (int t = 0; t < 4; t++) {
        const int64_t col = (j0 + t) * 16;
        const __m512 w = _mm512_loadu_ps(wscale + col);
        const __m512i zs = _mm512_slli_epi32(_mm512_loadu_si512(colsum + col), 7);
        for (int m = 0; m < rows; m++) {
          __m512i acc = _mm512_sub_epi32(_mm512_load_si512(c[t] + m * 16), zs);
          _mm512_storeu_ps(out + (m0 + m) * N + col, _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(w, _mm512_set1_ps(rs[m]))));
        }
      }
    }
  }
}

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  if (syscall(SYS_arch_prctl, 0x1023, 18)) return Ort::GetApi().CreateStatus(ORT_FAIL, "no AMX tile state");
  static Ort::CustomOpDomain domain{"deposium.experiment"};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> op{
      Ort::Custom::CreateLiteCustomOp("FusedRowQGemm", "CPUExecutionProvider", RowQGemm<false>)};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> rotating{
      Ort::Custom::CreateLiteCustomOp("FusedRotRowQGemm", "CPUExecutionProvider", RowQGemm<true>)};
  static bool added = false;
  if (!added) { domain.Add(op.get()); domain.Add(rotating.get()); added = true; }
  Ort::UnownedSessionOptions(options).Add(domain);
  return nullptr;
}
