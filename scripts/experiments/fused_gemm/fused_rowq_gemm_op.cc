// Experiment (not shipped): ONNX Runtime custom op "FusedRowQGemm" (domain deposium.experiment) =
// per-row absmax quantization to u8 + int8 GEMM + zero-point correction + row x column scales, in
// place of the shipped recipe's Abs/ReduceMax/Max/Div/QuantizeLinear/MatMulIntegerToFloat/Mul chain.
// Inputs: x fp32 [..., K], b int8 in AMX's B layout (fused_op.py: amx_layout), w_scale fp32 [N] (the
// shipped graph's column steps, 1/127 included), colsum int32 [N]. Output fp32 [..., N]. K and N must be
// multiples of 64. "FusedRotRowQGemm" first rotates each row by the block-32 Hadamard matrix, in place
// of the graph's Reshape/MatMul/Reshape (fused_op.py rewrite --rotation). The "...Bias" and
// "...BiasGelu" variants take a fifth input, bias fp32 [N], and fold the graph's bias Add (and the
// erf GELU after it, ONNX Runtime's BiasGelu) into the epilogue (fused_op.py rewrite --epilogue).
//
// The kernels are rowq_kernels.h's: AMX tiles where the CPU grants them, else AVX-512 VNNI, else AVX2
// (rowq_avx2.c, its own object: Zen 3 has no AVX-512). ROWQ_PATH=vnni or ROWQ_PATH=avx2 forces a
// path. All read the same packed weights and give the same bits (fused_gemm_probe ROWS 1 same).
//
// Build (headers: see README.md beside this file):
//   gcc -O3 -ffp-contract=off -mavx2 -mfma -fPIC -c -o /tmp/rowq_avx2.o scripts/experiments/fused_gemm/rowq_avx2.c
//   g++ -O3 -ffp-contract=off -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512vnni -mamx-tile -mamx-int8 -std=c++17
//       -fPIC -shared -I$ORT_INCLUDE -o /tmp/libfused_rowq_gemm.so scripts/experiments/fused_gemm/fused_rowq_gemm_op.cc
//       /tmp/rowq_avx2.o
// (The AVX-512 code only runs after the CPU check; an AVX2-only CPU runs rowq_avx2.o alone.)
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"
#include "rowq_kernels.h"
#include "rowq_avx2.h"
#include <unistd.h>
#include <sys/syscall.h>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

enum class Path { kAmx, kVnni, kAvx2 };
static Path path = Path::kVnni;

static void run(const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<int8_t>& b,
                const Ort::Custom::Tensor<float>& ws, const Ort::Custom::Tensor<int32_t>& cs,
                const float* bias, int act, bool rotate, Ort::Custom::Tensor<float>& y) {
  std::vector<int64_t> shape = x.Shape();
  const int64_t K = shape.back(), N = ws.NumberOfElement(), M = x.NumberOfElement() / K;
  shape.back() = N;
  float* out = y.Allocate(shape);
  const float* xin = x.Data();
  static thread_local std::vector<uint8_t> a;
  static thread_local std::vector<float> rs, scratch;
  const int64_t padded = (M + 15) / 16 * 16;  // the AMX path reads whole 16-row tiles
  a.resize(padded * K);
  rs.resize(M);
  scratch.resize(K);
  if (path == Path::kAvx2) {
    for (int64_t m = 0; m < M; m++) rs[m] = rowq_avx2_quantize_row(xin + m * K, K, rotate, scratch.data(), a.data() + m * K);
    rowq_avx2_gemm(M, a.data(), K, N, b.Data(), ws.Data(), rs.data(), act, bias, out);
    return;
  }
  for (int64_t m = 0; m < M; m++) rs[m] = rowq_quantize_row(xin + m * K, K, rotate, scratch.data(), a.data() + m * K);
#ifdef __AMX_INT8__
  if (path == Path::kAmx) {
    std::memset(a.data() + M * K, 128, (padded - M) * K);
    rowq_gemm_amx(M, a.data(), K, N, b.Data(), ws.Data(), cs.Data(), rs.data(), act, bias, out);
    return;
  }
#endif
  rowq_gemm_vnni(M, a.data(), K, N, b.Data(), ws.Data(), cs.Data(), rs.data(), act, bias, out);
}

template <bool kRotate>
void RowQGemm(const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<int8_t>& b,
              const Ort::Custom::Tensor<float>& ws, const Ort::Custom::Tensor<int32_t>& cs,
              Ort::Custom::Tensor<float>& y) {
  run(x, b, ws, cs, nullptr, ROWQ_NONE, kRotate, y);
}

template <bool kRotate, int kAct>
void RowQGemmBias(const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<int8_t>& b,
                  const Ort::Custom::Tensor<float>& ws, const Ort::Custom::Tensor<int32_t>& cs,
                  const Ort::Custom::Tensor<float>& bias, Ort::Custom::Tensor<float>& y) {
  run(x, b, ws, cs, bias.Data(), kAct, kRotate, y);
}

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  const char* forced = std::getenv("ROWQ_PATH");
  const bool vnni = __builtin_cpu_supports("avx512vnni") && !(forced && std::strcmp(forced, "avx2") == 0);
  const bool amx = vnni && __builtin_cpu_supports("amx-int8") && !(forced && std::strcmp(forced, "vnni") == 0) &&
                   syscall(SYS_arch_prctl, 0x1023, 18) == 0;  // ARCH_REQ_XCOMP_PERM, XTILEDATA
  path = amx ? Path::kAmx : vnni ? Path::kVnni : Path::kAvx2;
  if (path == Path::kAvx2 && !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")))
    return Ort::GetApi().CreateStatus(ORT_FAIL, "FusedRowQGemm needs AVX2 and FMA at least");
  static Ort::CustomOpDomain domain{"deposium.experiment"};
  using Op = std::unique_ptr<Ort::Custom::OrtLiteCustomOp>;
  static Op ops[] = {
      Op{Ort::Custom::CreateLiteCustomOp("FusedRowQGemm", "CPUExecutionProvider", RowQGemm<false>)},
      Op{Ort::Custom::CreateLiteCustomOp("FusedRotRowQGemm", "CPUExecutionProvider", RowQGemm<true>)},
      Op{Ort::Custom::CreateLiteCustomOp("FusedRowQGemmBias", "CPUExecutionProvider", RowQGemmBias<false, ROWQ_BIAS>)},
      Op{Ort::Custom::CreateLiteCustomOp("FusedRotRowQGemmBias", "CPUExecutionProvider", RowQGemmBias<true, ROWQ_BIAS>)},
      Op{Ort::Custom::CreateLiteCustomOp("FusedRowQGemmBiasGelu", "CPUExecutionProvider", RowQGemmBias<false, ROWQ_BIAS_GELU>)},
      Op{Ort::Custom::CreateLiteCustomOp("FusedRotRowQGemmBiasGelu", "CPUExecutionProvider", RowQGemmBias<true, ROWQ_BIAS_GELU>)},
  };
  static bool added = false;
  if (!added) {
    for (Op& op : ops) domain.Add(op.get());
    added = true;
  }
  Ort::UnownedSessionOptions(options).Add(domain);
  return nullptr;
}
