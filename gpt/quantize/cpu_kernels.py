"""Hand-written AVX2 kernels for the weight-only int8 and int4 products of batch-1 decoding on a CPU.

Why they exist. A decoding step multiplies one row of activations (or a few) by every
weight matrix once, so its speed is set by how fast the weights stream from memory: int8
weights are a quarter of fp32's bytes, int4 an eighth. That only pays if the kernel keeps
up with memory. On a CPU whose best instruction set is AVX2 (no AVX-512), torch's own packed
kernels (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`) fall back to scalar
code that reads well under 1 GB/s, slower than the fp32 product they should beat. These two
kernels are compiled once from the C++ below with `torch.utils.cpp_extension.load_inline`
(`-O3 -mavx2 -mfma -fopenmp`) and cached in torch's extension folder; later processes load the
cached library in well under a second. The source includes only the torch headers it needs
(pybind11 glue and ATen's parallel_for), not all of <torch/extension.h>: that halves the
compile. `python -m benchmarks.quant_kernels` measures them against fp32 and torch's kernels;
tests/test_cpu_kernels.py checks them against a plain dequantize-then-matmul reference.

The formats (x is (M, K) float32, the weight is (N, K), the result is (M, N) = x @ w.T):

    int8   qweight (N, K) int8, scales (N,) float32           w[n, k] = scales[n] * qweight[n, k]
    int4   codes (N, K/2) uint8, scales and zeros (N, K/G) float32, group size G along K:
           w[n, k] = (q[n, k] - 8) * scales[n, k // G] + zeros[n, k // G]
           q[n, 2j] is the LOW nibble of codes[n, j], q[n, 2j + 1] its HIGH nibble

The tricks, in the order the C++ uses them:

* One output row per task. The N weight rows are split over torch's intra-op threads
  (`at::parallel_for`, so `torch.set_num_threads` applies). Each row of weights is read once,
  and while it sits in L1 it is multiplied by up to four rows of x at a time: converting the
  integers to floats is paid once for all of them. That is why M = 1..8 is fast. Larger M is
  correct but is not what the kernels are for: each weight element still costs one conversion
  per 4 rows of x and one multiply-add per row, so the time grows about linearly with M, while
  a float GEMM (dequantize, then `x @ w.T`) reuses each weight from registers across many
  rows. Measured on a 1536 x 576 weight, one thread, the dequantize-then-matmul reference
  catches up at about 32 to 64 rows: use it for the prefill of longer prompts.
* Widen, convert, multiply-add. 8 int8 weights become 8 float32 lanes with
  `_mm256_cvtepi8_epi32` (sign-extend) then `_mm256_cvtepi32_ps`, and one FMA multiplies them
  by 8 elements of x; 16 weights per step, into two independent accumulators per row of x. The
  per-row scale is applied once, after the sum. A K that is not a multiple of 16 finishes with
  a scalar loop. (On the AVX2 machine this was measured on, an AMD EPYC of the first Zen
  generation, the conversion rather than memory is the limit: 256-bit operations run as two
  128-bit halves there, and a widen-and-convert costs more than the FMA itself. Wider steps,
  more accumulators and bit tricks that build the float without a conversion instruction were
  measured no faster.)
* Int4: de-interleave x, not the nibbles. 8 code bytes hold 16 weights; zero-extended into 8
  int32 lanes, `& 0xF` gives the 8 even-k weights and `>> 4` the 8 odd-k weights. Rather than
  shuffling them back into k order for every weight row, x is rearranged once per call so that
  each block of 16 holds its 8 even-k elements, then its 8 odd-k elements. That costs M * K
  moves per call, shared by all N rows.
* Int4: fold the offset and the zero point out of the inner loop. Within a group,
      sum_k x_k * ((q_k - 8) * s + z) = s * sum_k x_k q_k + (z - 8 s) * sum_k x_k,
  so the inner loop only multiplies x by the raw codes; the group sums of x are computed once
  per row of x (shared by all N rows); each group adds s times its vector of partial sums, and
  the (z - 8 s) terms are one short loop over the groups at the end, 8 at a time. The horizontal sum
  of the vector happens once per output. The group size is a template parameter, so the loop
  over a group's blocks of 16 is unrolled (hence G in {16, 32, 64, 128, 256}).

Numbers: both kernels sum float32 products, in a different order than a float GEMM, so they
agree with a float64 reference to within float32 rounding of K terms (tested with that bound).

Use: `available()` compiles or loads the kernels on first call (about 30 s to compile, once
per machine and torch version, and one line on stderr says so; about 40 ms to load later).
It is False, with the reason in `why_unavailable()`, when the CPU lacks AVX2/FMA, the
platform is not Linux/x86-64, or the compiler, ninja or the build fails; it never raises.
Callers then use the reference. The kernels hold no state: concurrent calls from several
Python threads are safe (loading is guarded by a lock).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

_SOURCE = r"""
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> Python, without the rest of <torch/extension.h>
#include <torch/csrc/Exceptions.h>    // turns TORCH_CHECK failures into Python errors
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 8 int8 at p -> 8 float32 lanes.
inline __m256 int8x8_to_float(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Weights are split over threads in runs of rows worth at least this many bytes, so a small
// matrix is not cut into pieces smaller than the cost of waking a thread.
constexpr int64_t kMinBytesPerTask = 32 * 1024;

int64_t rows_per_task(int64_t bytes_per_row) {
    return std::max<int64_t>(1, kMinBytesPerTask / std::max<int64_t>(1, bytes_per_row));
}

// out[r * ldo] = scale * dot(x[r], w) for the R rows of x (row length K, contiguous), R in 1..4.
// Each step converts 16 weights once and multiplies them into every row's two accumulators
// (R rows of accumulators plus 2 weight vectors fit easily in the 16 ymm registers).
template <int R>
void int8_dot_rows(const float* x, int64_t K, const int8_t* w, float scale, float* out, int64_t ldo) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m256 w0 = int8x8_to_float(w + k), w1 = int8x8_to_float(w + k + 8);
        for (int r = 0; r < R; ++r) {
            const float* xr = x + r * K + k;
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), w1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; ++r) {
        float sum = horizontal_sum(_mm256_add_ps(acc[r][0], acc[r][1]));
        for (int64_t t = k; t < K; ++t) sum += x[r * K + t] * static_cast<float>(w[t]);  // K % 16 tail
        out[r * ldo] = scale * sum;
    }
}

// Adds scale * (sum over the group of G = 16 * B weights at k0 of x * q) to total[r], for the R
// rows of x. xd holds x de-interleaved: per block of 16, the 8 even-k elements, then the 8 odd-k ones.
template <int R, int B>
inline void int4_group(const float* xd, int64_t K, const uint8_t* codes, int64_t k0, float scale, __m256* total) {
    const __m256i low_nibble = _mm256_set1_epi32(0xF);
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int b = 0; b < B; ++b) {
        const int64_t k = k0 + 16 * b;
        // 8 code bytes = weights k .. k+15, one byte per int32 lane.
        const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + k / 2));
        const __m256i bytes = _mm256_cvtepu8_epi32(packed);
        const __m256 even = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, low_nibble));  // q[k], q[k+2], ...
        const __m256 odd = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));          // q[k+1], q[k+3], ...
        for (int r = 0; r < R; ++r) {
            const float* xr = xd + r * K + k;
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), even, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), odd, acc[r][1]);
        }
    }
    const __m256 s = _mm256_set1_ps(scale);
    for (int r = 0; r < R; ++r) total[r] = _mm256_fmadd_ps(s, _mm256_add_ps(acc[r][0], acc[r][1]), total[r]);
}

// Like int8_dot_rows, for one row of int4 codes in groups of G = 16 * B weights (B is a template
// parameter so that the short loop over a group's blocks is unrolled). xsum[r * groups + g] is the
// sum of x[r] over group g. At the end, the sum over groups of (z - 8 s) * xsum.
template <int R, int B>
void int4_dot_rows(const float* xd, const float* xsum, int64_t K, const uint8_t* codes, const float* scales,
                   const float* zeros, float* out, int64_t ldo) {
    constexpr int64_t G = 16 * B;
    const int64_t groups = K / G;
    __m256 total[R];
    for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) int4_group<R, B>(xd, K, codes, g * G, scales[g], total);
    const __m256 eight = _mm256_set1_ps(8.0f);
    for (int r = 0; r < R; ++r) {
        // sum over groups of (z - 8 s) * xsum, 8 groups at a time (a scalar chain of adds would stall).
        __m256 bias8 = _mm256_setzero_ps();
        int64_t h = 0;
        for (; h + 8 <= groups; h += 8) {
            const __m256 offset = _mm256_fnmadd_ps(eight, _mm256_loadu_ps(scales + h), _mm256_loadu_ps(zeros + h));
            bias8 = _mm256_fmadd_ps(offset, _mm256_loadu_ps(xsum + r * groups + h), bias8);
        }
        float bias = horizontal_sum(bias8);
        for (; h < groups; ++h) bias += (zeros[h] - 8.0f * scales[h]) * xsum[r * groups + h];
        out[r * ldo] = horizontal_sum(total[r]) + bias;
    }
}

// Calls f(rows, m0) for the rows of x in blocks of at most 4, rows a compile-time constant
// (std::integral_constant), so that each block size gets its own unrolled kernel.
template <typename F>
void over_row_blocks(int64_t M, const F& f) {
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) f(std::integral_constant<int, 4>(), m0);
    switch (M - m0) {
        case 3: f(std::integral_constant<int, 3>(), m0); break;
        case 2: f(std::integral_constant<int, 2>(), m0); break;
        case 1: f(std::integral_constant<int, 1>(), m0); break;
        default: break;
    }
}

void check_float_matrix(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2,
                name, " must be a 2-D float32 CPU tensor, got ", t.scalar_type(), " of shape ", t.sizes());
}

void check_weight(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == dim,
                name, " must be a ", dim, "-D ", dtype, " CPU tensor, got ", t.scalar_type(), " of shape ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (make it so once, when the layer is built)");
}

}  // namespace

// x (M, K) float32, qweight (N, K) int8, scales (N,) float32 -> (M, N) float32.
at::Tensor int8_matmul(at::Tensor x, at::Tensor qweight, at::Tensor scales) {
    check_float_matrix(x, "x");
    check_weight(qweight, "qweight", at::kChar, 2);
    check_weight(scales, "scales", at::kFloat, 1);
    const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
    TORCH_CHECK(qweight.size(1) == K, "qweight is ", qweight.sizes(), " but x has K = ", K, " columns");
    TORCH_CHECK(scales.size(0) == N, "scales has ", scales.size(0), " entries for ", N, " weight rows");
    x = x.contiguous();  // a copy only when x is a strided view: M * K floats, small
    auto out = x.new_empty({M, N});
    const float* xp = x.data_ptr<float>();
    const int8_t* wp = qweight.data_ptr<int8_t>();
    const float* sp = scales.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, N, rows_per_task(K), [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
            over_row_blocks(M, [&](auto rows, int64_t m0) {
                int8_dot_rows<decltype(rows)::value>(xp + m0 * K, K, wp + n * K, sp[n], op + m0 * N + n, N);
            });
    });
    return out;
}

// x (M, K) float32, codes (N, K/2) uint8, scales and zeros (N, K/G) float32 -> (M, N) float32.
at::Tensor int4_matmul(at::Tensor x, at::Tensor codes, at::Tensor scales, at::Tensor zeros, int64_t group_size) {
    check_float_matrix(x, "x");
    check_weight(codes, "codes", at::kByte, 2);
    check_weight(scales, "scales", at::kFloat, 2);
    check_weight(zeros, "zeros", at::kFloat, 2);
    const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), G = group_size;
    TORCH_CHECK(G == 16 || G == 32 || G == 64 || G == 128 || G == 256,
                "group_size must be one of 16, 32, 64, 128, 256, got ", G);
    TORCH_CHECK(K % G == 0, "K = ", K, " is not a multiple of group_size ", G);
    TORCH_CHECK(codes.size(1) * 2 == K, "codes is ", codes.sizes(), " but x has K = ", K, " columns (need K / 2)");
    const int64_t groups = K / G;
    TORCH_CHECK(scales.size(0) == N && scales.size(1) == groups, "scales is ", scales.sizes(), ", expected [",
                N, ", ", groups, "]");
    TORCH_CHECK(zeros.sizes() == scales.sizes(), "zeros is ", zeros.sizes(), ", expected ", scales.sizes());
    x = x.contiguous();
    const float* xp = x.data_ptr<float>();
    // Once per call, shared by all N weight rows: x de-interleaved per block of 16 (even k, then
    // odd k), and x's group sums. Plain loops: M * K elements, cheaper than dispatching torch ops.
    std::vector<float> xd(M * K), xsum(M * groups, 0.0f);
    for (int64_t i = 0; i < M * K; i += 16)
        for (int64_t j = 0; j < 8; ++j) {
            xd[i + j] = xp[i + 2 * j];
            xd[i + 8 + j] = xp[i + 2 * j + 1];
        }
    for (int64_t i = 0; i < M * K; ++i) xsum[i / G] += xp[i];
    auto out = x.new_empty({M, N});
    const uint8_t* cp = codes.data_ptr<uint8_t>();
    const float* sp = scales.data_ptr<float>();
    const float* zp = zeros.data_ptr<float>();
    float* op = out.data_ptr<float>();
    auto run = [&](auto blocks_per_group) {
        constexpr int B = decltype(blocks_per_group)::value;
        at::parallel_for(0, N, rows_per_task(K / 2 + 8 * groups), [&](int64_t begin, int64_t end) {
            for (int64_t n = begin; n < end; ++n)
                over_row_blocks(M, [&](auto rows, int64_t m0) {
                    int4_dot_rows<decltype(rows)::value, B>(xd.data() + m0 * K, xsum.data() + m0 * groups, K,
                                                            cp + n * (K / 2), sp + n * groups, zp + n * groups,
                                                            op + m0 * N + n, N);
                });
        });
    };
    switch (G) {
        case 16: run(std::integral_constant<int, 1>()); break;
        case 32: run(std::integral_constant<int, 2>()); break;
        case 64: run(std::integral_constant<int, 4>()); break;
        case 128: run(std::integral_constant<int, 8>()); break;
        default: run(std::integral_constant<int, 16>()); break;
    }
    return out;
}
"""

_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
_COMPILE_SECONDS = 30  # measured on a 2-core AMD EPYC (Zen 1) VM, gcc 12; quoted in the stderr line

_lock = threading.Lock()
_module: ModuleType | None = None
_reason: str | None = None  # why the kernels are unavailable, once known


def _cpu_reason() -> str | None:
    """Why this CPU/platform cannot run the kernels, or None. Checked before loading: a library
    compiled with -mavx2 may use AVX2 instructions anywhere, so loading it on an older CPU would crash."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the kernels are built for Linux on x86-64 only (this is {sys.platform} on {platform.machine()})"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError as error:
        return f"cannot read /proc/cpuinfo to check for AVX2 and FMA: {error}"
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    missing = [flag for flag in ("avx2", "fma") if flag not in flags]
    return f"this CPU lacks {' and '.join(missing)}" if missing else None


def _build_directory(name: str) -> Path:
    """Where torch keeps JIT extensions (TORCH_EXTENSIONS_DIR or its default), one folder per source version."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return root / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / name


def _load() -> ModuleType | None:
    """The compiled kernels, building them on the first call in this machine's cache; None when unavailable."""
    global _module, _reason
    with _lock:
        if _module is not None or _reason is not None:
            return _module
        _reason = _cpu_reason()
        if _reason is not None:
            return None
        try:
            from torch.utils.cpp_extension import is_ninja_available, load_inline

            if not is_ninja_available():
                _reason = "ninja is not installed (pip install ninja): torch needs it to build C++ extensions"
                return None
            digest = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + torch.__version__).encode()).hexdigest()[:12]
            name = f"gpt_quant_cpu_kernels_{digest}"
            folder = _build_directory(name)
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / f"{name}.so").exists():
                print(f"[compiling the int8/int4 CPU kernels once (about {_COMPILE_SECONDS} s)...]",
                      file=sys.stderr, flush=True)
            _module = load_inline(name=name, cpp_sources=_SOURCE, functions=["int8_matmul", "int4_matmul"],
                                  extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(folder),
                                  no_implicit_headers=True, verbose=False)
        except Exception as error:  # a missing compiler, a failed build: callers fall back to the reference
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            # The first line names the step; the compiler's own complaint comes last.
            summary = lines[0][:150] + "".join(f" | {line[:200]}" for line in lines[1:][-2:]) if lines else ""
            _reason = f"building the kernels failed: {type(error).__name__}: {summary}"
        return _module


def available() -> bool:
    """True when the kernels can run here; the first call compiles or loads them (see the module docstring)."""
    return _load() is not None


def why_unavailable() -> str:
    """Why `available()` is False ("" when it is True)."""
    _load()
    return _reason or ""


def _kernels() -> ModuleType:
    module = _load()
    if module is None:
        raise RuntimeError(f"the int8/int4 CPU kernels are unavailable: {_reason}")
    return module


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 @ dequantized weight (N, K).T -> (M, N) float32, with w[n, k] = scales[n] * qweight[n, k].

    qweight (N, K) int8 and scales (N,) float32 must be contiguous (checked; a clear error
    otherwise); x may be a strided view (copied, it is small). Any K works (a K % 16 tail is
    summed scalar). Fast for M = 1..8, the rows of a decoding step; correct for any M, but
    from about 32 rows on, dequantizing and using `x @ w.T` is as fast or faster. Raises RuntimeError
    when `available()` is False.
    """
    return _kernels().int8_matmul(x, qweight, scales)


def int4_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x (M, K) float32 @ dequantized int4 weight (N, K).T -> (M, N) float32.

    codes (N, K // 2) uint8 holds two 4-bit codes per byte, q[n, 2j] in the low nibble of
    codes[n, j] and q[n, 2j + 1] in the high one; scales and zeros (N, K // group_size)
    float32; w[n, k] = (q[n, k] - 8) * scales[n, k // G] + zeros[n, k // G]. group_size is one
    of 16, 32, 64, 128, 256 and divides K. The weight tensors must be contiguous; x may be a
    strided view. Fast for M = 1..8; correct for any M, but from about 32 rows on,
    dequantizing and using `x @ w.T` is as fast or faster. Raises RuntimeError when
    `available()` is False.
    """
    return _kernels().int4_matmul(x, codes, scales, zeros, group_size)
