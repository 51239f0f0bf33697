// Lookup-table GEMV/GEMM over packed indices (docs/RUNTIME.md).
//
//   y[t, r] = sum_c x[t, c] * W[r, c],   W[r, c] = table[r * ng + c / gs][idx[r, c]]
//
// Packed indices, one row after another, `stride` bytes a row. 2, 3 and 4 bits: blocks of
// 32 columns in 4 * bits bytes (the last block padded with index 0), laid out so that AVX2
// unpacks a block to its 32 byte-indices in column order with a broadcast load, a shift and
// a mask, ready for the same vpshufb 16-entry table lookup (3 bits: two lookups and a blend):
//   4 bits: 16 bytes; byte j holds column j in its low nibble and column j + 16 in its high
//           nibble (one 128-bit load, a mask and a shift).
//   2 bits: 8 bytes; byte j (j < 8) holds columns j, j + 8, j + 16, j + 24 in bits 0-1, 2-3,
//           4-5, 6-7 (the 64-bit word broadcast to four lanes, lane q shifted right by 2q,
//           masked with 3).
//   3 bits: 12 bytes: the low two bits of each index as a 2-bit block (8 bytes), then the
//           third bit in 4 bytes, byte j (j < 4) bit m holding column j + 4m (the 32-bit word
//           broadcast to eight lanes, lane m shifted left by 7 - m, puts each column's third
//           bit in its byte's sign bit: vpblendvb picks between the low bits' lookups in
//           entries 0-3 and 4-7).
//   8 bits: one byte a column.
// Tables: float32 [rows * ng, L] (reference path) or int8 [rows * ng, 16] with one float32
// scale a table (fast path: level ~= scale * int8); 2- and 3-bit indices use the first 4 or
// 8 entries of the same 16-entry tables.
//
// Three paths:
//   hwq_ref   fp32 levels, fp32 activations, fp32 accumulation in column order (exact
//             reference; 4 or 8 bits; any group size).
//   hwq_q8    int8 levels (per-table scale), int8 activations (per 32-column block scale),
//             exact int32 block sums, fp32 accumulation of the scaled block sums; 2, 3 or
//             4 bits, gs a multiple of 32 or gs == cols. AVX2 (vpshufb table lookups) when
//             compiled for it, else a portable scalar loop computing the same block sums.
//             Each width is its own instantiation of the loops (templates on BITS).
//   hwq_f32a  int8 levels, fp32 activations (measured against hwq_q8 by the benchmark).
// Batches (b > 1) unpack each row once into a per-thread buffer and use it for every token.
//
// Threads: the products split their rows over a small persistent pool (hwq_parallel below)
// instead of an OpenMP region. A decode step runs ~100-200 products of ~20-100 us each; an
// OpenMP team whose threads sleep between regions (OMP_WAIT_POLICY=passive, which the
// project sets so idle threads leave the cores to Ray and torch) costs ~100 us to wake, more
// than a product, while the pool's workers spin for a short while after each job and only
// then sleep, so back-to-back products of one token find them awake.
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#include <unistd.h>

#include <algorithm>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

// ---- the thread pool -------------------------------------------------------------------
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// Workers besides the caller. A job is published by bumping `gen` (and opening it); a worker
// spins on `gen` for ~kSpin pauses (~1-2 ms) after its last job, then sleeps on the
// condition variable. The job function takes chunks of rows from a shared counter until none
// is left, so a worker the OS has not scheduled yet (another process on the core) delays
// nothing: the caller takes its chunks. The caller then closes the job and waits only for
// workers inside it (each finishing the chunk it took); a worker that wakes after the close
// sees it closed and never touches the (by then gone) job.
struct Pool {
    static constexpr int kSpin = 1 << 15;
    std::vector<std::thread> threads;
    std::atomic<uint64_t> gen{0};
    std::atomic<uint64_t> open{0};  // the generation workers may still join; 0: none
    std::atomic<int> inside{0};     // workers inside the job function
    const std::function<void()>* job = nullptr;
    std::mutex m;
    std::condition_variable cv;
    std::mutex busy;  // one job at a time (see hwq_parallel)
    pid_t pid = getpid();

    // `seen`: the generation before the job the worker was made for (read by the caller: a
    // worker that read it itself could start after the bump and miss that job).
    void worker(uint64_t seen) {
        for (;;) {
            uint64_t g;
            int spins = 0;
            while ((g = gen.load(std::memory_order_acquire)) == seen) {
                if (++spins < kSpin) {
                    cpu_relax();
                } else {
                    std::unique_lock<std::mutex> lk(m);
                    cv.wait(lk, [&] { return gen.load(std::memory_order_acquire) != seen; });
                    spins = 0;
                }
            }
            seen = g;
            inside.fetch_add(1, std::memory_order_seq_cst);
            if (open.load(std::memory_order_seq_cst) == g) (*job)();
            inside.fetch_sub(1, std::memory_order_seq_cst);
        }
    }

    // f() on the caller and on up to n - 1 workers; returns when every call has returned.
    void run(int n, const std::function<void()>& f) {
        const uint64_t g0 = gen.load(std::memory_order_acquire);
        while ((int)threads.size() < n - 1) {
            threads.emplace_back([this, g0] { worker(g0); });
            threads.back().detach();  // never joined: the pool lives as long as the process
        }
        job = &f;
        open.store(g0 + 1, std::memory_order_seq_cst);
        {
            std::lock_guard<std::mutex> lk(m);  // a worker about to sleep sees the new gen
            gen.store(g0 + 1, std::memory_order_release);
        }
        cv.notify_all();
        f();
        open.store(0, std::memory_order_seq_cst);
        while (inside.load(std::memory_order_seq_cst) != 0) cpu_relax();
    }
};

Pool* the_pool() {
    // Never destroyed (detached workers may still spin at exit). A forked child has none of
    // its parent's threads: it makes its own pool.
    static Pool* pool = nullptr;
    static std::mutex m;
    std::lock_guard<std::mutex> lk(m);
    if (pool == nullptr || pool->pid != getpid()) pool = new Pool();
    return pool;
}

// body(r0, r1) over [0, rows) in chunks of consecutive rows, on up to `threads` threads.
template <class F>
void hwq_parallel(int64_t rows, int threads, F&& body) {
    const int n = (int)std::max<int64_t>(1, std::min<int64_t>(threads, rows / 16));
    if (n == 1) {
        body((int64_t)0, rows);
        return;
    }
    Pool* pool = the_pool();
    // Another thread's product holds the pool (hwq serve generates on several threads): this
    // one runs on its caller alone rather than wait.
    std::unique_lock<std::mutex> lk(pool->busy, std::try_to_lock);
    if (!lk.owns_lock()) {
        body((int64_t)0, rows);
        return;
    }
    const int64_t chunk = std::max<int64_t>(16, (rows + 4 * n - 1) / (4 * n));
    std::atomic<int64_t> next{0};
    const std::function<void()> take = [&] {
        for (;;) {
            const int64_t r0 = next.fetch_add(chunk, std::memory_order_relaxed);
            if (r0 >= rows) return;
            body(r0, std::min<int64_t>(rows, r0 + chunk));
        }
    };
    pool->run(n, take);
}

}  // namespace

extern "C" {

int hwq_abi_version() { return 2; }

int hwq_has_avx2() {
#if defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

// One block of 32 indices (each < 2**bits) -> its 4 * bits packed bytes (layouts above).
static inline void pack_block(const uint8_t* v, int bits, uint8_t* o) {
    if (bits == 4) {
        for (int j = 0; j < 16; ++j) o[j] = (uint8_t)((v[j] & 15) | (v[j + 16] << 4));
        return;
    }
    // As words (little-endian): word q of 8 columns, masked to 2 bits a byte, shifted by 2q
    // and or-ed never carries between bytes; likewise the third bits, 4 columns a word.
    uint64_t w[4], lo = 0;
    std::memcpy(w, v, 32);
    for (int q = 0; q < 4; ++q) lo |= (w[q] & 0x0303030303030303ull) << (2 * q);
    std::memcpy(o, &lo, 8);
    if (bits == 3) {
        uint32_t h[8], hi = 0;
        std::memcpy(h, v, 32);
        for (int m = 0; m < 8; ++m) hi |= ((h[m] >> 2) & 0x01010101u) << m;
        std::memcpy(o + 8, &hi, 4);
    }
}

// uint8 [rows, cols] indices (< 2**bits) -> the 2-, 3- or 4-bit layout,
// uint8 [rows, nblk * 4 * bits].
void hwq_pack(const uint8_t* full, int64_t rows, int64_t cols, int bits, uint8_t* out,
              int threads) {
    const int64_t nblk = (cols + 31) / 32, bb = 4 * bits;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* in = full + r * cols;
        uint8_t* o = out + r * nblk * bb;
        int64_t k = 0;
        for (; (k + 1) * 32 <= cols; ++k) pack_block(in + k * 32, bits, o + k * bb);
        if (k < nblk) {  // the last, partial block: padded with index 0
            uint8_t v[32] = {0};
            std::memcpy(v, in + k * 32, (size_t)(cols - k * 32));
            pack_block(v, bits, o + k * bb);
        }
    }
}

// out[pos[i]] = codes[i] for i < n; returns how many positions were out of [0, numel)
// (then skipped: the caller refuses the tensor).
int64_t hwq_scatter_u8(const int64_t* pos, const uint8_t* codes, int64_t n, uint8_t* out,
                       int64_t numel) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t p = pos[i];
        if (p < 0 || p >= numel) { ++bad; continue; }
        out[p] = codes[i];
    }
    return bad;
}

static inline int idx_at(const uint8_t* row, int bits, int64_t c) {
    if (bits == 8) return row[c];
    if (bits == 4) {
        const uint8_t b = row[(c >> 5) * 16 + (c & 15)];
        return (c & 16) ? (b >> 4) : (b & 15);
    }
    const uint8_t* blk = row + (c >> 5) * 4 * bits;
    const int j = (int)(c & 31);
    const int lo = (blk[j & 7] >> (2 * (j >> 3))) & 3;
    return bits == 2 ? lo : lo | (((blk[8 + (j & 3)] >> (j >> 2)) & 1) << 2);
}

// Reference: x fp32 [b, cols], tables fp32 [rows * ng, L], y fp32 [b, rows].
void hwq_ref(const float* x, int64_t b, int64_t cols, const uint8_t* idx, int64_t rows,
             int64_t stride, int bits, const float* tables, int64_t L, int64_t gs, float* y,
             int threads) {
    const int64_t ng = cols / gs;
    hwq_parallel(rows, threads, [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
        const uint8_t* row = idx + r * stride;
        for (int64_t t = 0; t < b; ++t) {
            const float* xt = x + t * cols;
            float acc = 0.0f;
            for (int64_t c = 0; c < cols; ++c) {
                const float* tab = tables + (r * ng + c / gs) * L;
                acc += xt[c] * tab[idx_at(row, bits, c)];
            }
            y[t * rows + r] = acc;
        }
    }
    });
}

// Activations to int8: per token, per 32-column block, scale = max|x| / 127 and
// q = nearbyint(x / scale) (round half to even); padding columns are 0.
void hwq_quantize_x(const float* x, int64_t b, int64_t cols, int8_t* xq, float* xs) {
    const int64_t nblk = (cols + 31) / 32;
    for (int64_t t = 0; t < b; ++t) {
        for (int64_t k = 0; k < nblk; ++k) {
            const int64_t c0 = k * 32, n = (cols - c0 < 32) ? cols - c0 : 32;
            const float* xb = x + t * cols + c0;
            float amax = 0.0f;
            for (int64_t j = 0; j < n; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
            const float d = amax / 127.0f;
            const float inv = d > 0.0f ? 1.0f / d : 0.0f;
            int8_t* q = xq + (t * nblk + k) * 32;
            for (int64_t j = 0; j < 32; ++j)
                q[j] = j < n ? (int8_t)std::nearbyint(xb[j] * inv) : 0;
            xs[t * nblk + k] = d;
        }
    }
}

extern "C++" {  // (templates: the bit widths' specialised loops)
#if defined(__AVX2__)
// One packed 2- or 4-bit block -> its 32 indices as bytes, in column order (layouts above).
template <int BITS>
static inline __m256i unpack32(const uint8_t* p) {
    if constexpr (BITS == 4) {
        const __m128i m4 = _mm_set1_epi8(0x0F);
        const __m128i v = _mm_loadu_si128((const __m128i*)p);
        return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
    }
    static_assert(BITS == 2 || BITS == 4, "3 bits: lookup32");
    int64_t w2;
    std::memcpy(&w2, p, 8);
    return _mm256_and_si256(
        _mm256_srlv_epi64(_mm256_set1_epi64x(w2), _mm256_set_epi64x(6, 4, 2, 0)),
        _mm256_set1_epi8(3));
}
// The 32 levels of a packed block: table entries (tab: 16 int8, broadcast to both lanes)
// at its indices. 3 bits: the low bits look up entries 0-3 and 4-7 and the third bit picks
// one (shifted into each byte's sign bit, which is all vpblendvb reads: no mask, no or;
// measured ~5% faster at batch 1 than or-ing the third bit into the index).
template <int BITS>
static inline __m256i lookup32(__m256i tab, const uint8_t* p) {
    if constexpr (BITS != 3) {
        return _mm256_shuffle_epi8(tab, unpack32<BITS>(p));
    } else {
        const __m256i lo = unpack32<2>(p);
        int32_t w1;
        std::memcpy(&w1, p + 8, 4);
        const __m256i sel = _mm256_sllv_epi32(_mm256_set1_epi32(w1),
                                              _mm256_set_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        return _mm256_blendv_epi8(_mm256_shuffle_epi8(tab, lo),
                                  _mm256_shuffle_epi8(_mm256_srli_si256(tab, 4), lo), sel);
    }
}
static inline __m256i load_table(const int8_t* t) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)t));
}
// Exact int32 sums of 32 int8 products, 8 lanes (lane l: columns 4l..4l+3).
static inline __m256i dot32(__m256i w, __m256i xv) {
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline int32_t dot32_scalar(const int8_t* w, const int8_t* xq) {
    int32_t s = 0;
    for (int j = 0; j < 32; ++j) s += (int32_t)w[j] * (int32_t)xq[j];
    return s;
}

template <int BITS>
static inline void unpack_row_scalar(const uint8_t* row, const int8_t* tq, int64_t nblk,
                                     int64_t gsb, int8_t* out) {
    for (int64_t k = 0; k < nblk; ++k) {
        const int8_t* tab = tq + (k / gsb) * 16;
        for (int j = 0; j < 32; ++j) out[k * 32 + j] = tab[idx_at(row, BITS, k * 32 + j)];
    }
}

// Fast path. x fp32 [b, cols]; idx BITS-bit [rows, nblk * 4 * BITS]; tq int8 [rows * ng, 16];
// ts fp32 [rows * ng]; gs = cols / ng (a multiple of 32 unless ng == 1); y fp32 [b, rows].
// scalar != 0 forces the portable loop (tests compare the two).
template <int BITS>
static void q8_impl(const float* x, int64_t b, int64_t cols, const uint8_t* idx, int64_t rows,
                    const int8_t* tq, const float* ts, int64_t ng, float* y, int threads,
                    int scalar) {
    constexpr int64_t BB = 4 * BITS;  // bytes a packed block
    const int64_t nblk = (cols + 31) / 32;
    const int64_t gsb = ng == 1 ? nblk : (cols / ng) / 32;  // blocks a table covers
    std::vector<int8_t> xq(b * nblk * 32);
    std::vector<float> xs(b * nblk);
    hwq_quantize_x(x, b, cols, xq.data(), xs.data());
#if defined(__AVX2__)
    const bool simd = !scalar;
#else
    const bool simd = false;
    (void)scalar;
#endif
    hwq_parallel(rows, threads, [&](int64_t r_begin, int64_t r_end) {
        std::vector<int8_t> wbuf(b > 1 || !simd ? nblk * 32 : 0);
        for (int64_t r = r_begin; r < r_end; ++r) {
            const uint8_t* row = idx + r * nblk * BB;
            const int8_t* trow = tq + r * ng * 16;
            const float* srow = ts + r * ng;
#if defined(__AVX2__)
            if (simd && b == 1) {
                __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
                for (int64_t g = 0; g < ng; ++g) {
                    const __m256i tab = load_table(trow + g * 16);
                    const float sg = srow[g];
                    const int64_t k0 = g * gsb, k1 = (k0 + gsb < nblk) ? k0 + gsb : nblk;
                    int64_t k = k0;
                    for (; k + 1 < k1; k += 2) {
                        const __m256i w0 = lookup32<BITS>(tab, row + k * BB);
                        const __m256i w1 = lookup32<BITS>(tab, row + k * BB + BB);
                        const __m256i s0 = dot32(w0, _mm256_loadu_si256((const __m256i*)(xq.data() + k * 32)));
                        const __m256i s1 = dot32(w1, _mm256_loadu_si256((const __m256i*)(xq.data() + k * 32 + 32)));
                        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_set1_ps(xs[k] * sg), acc0);
                        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_set1_ps(xs[k + 1] * sg), acc1);
                    }
                    if (k < k1) {
                        const __m256i w0 = lookup32<BITS>(tab, row + k * BB);
                        const __m256i s0 = dot32(w0, _mm256_loadu_si256((const __m256i*)(xq.data() + k * 32)));
                        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_set1_ps(xs[k] * sg), acc0);
                    }
                }
                y[r] = hsum(_mm256_add_ps(acc0, acc1));
                continue;
            }
            if (simd) {  // b > 1: unpack the row once, then tiles of 4 tokens share it
                for (int64_t k = 0; k < nblk; ++k) {
                    const __m256i tab = load_table(trow + (k / gsb) * 16);
                    _mm256_storeu_si256((__m256i*)(wbuf.data() + k * 32),
                                        lookup32<BITS>(tab, row + k * BB));
                }
                for (int64_t t0 = 0; t0 < b; t0 += 4) {
                    const int nt = (int)((b - t0 < 4) ? b - t0 : 4);
                    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(),
                                     _mm256_setzero_ps(), _mm256_setzero_ps()};
                    const __m256i ones = _mm256_set1_epi16(1);
                    for (int64_t k = 0; k < nblk; ++k) {
                        const __m256i w = _mm256_loadu_si256((const __m256i*)(wbuf.data() + k * 32));
                        const __m256i aw = _mm256_sign_epi8(w, w);
                        const float sg = srow[k / gsb];
                        for (int q = 0; q < nt; ++q) {
                            const int64_t t = t0 + q;
                            const __m256i xv = _mm256_loadu_si256(
                                (const __m256i*)(xq.data() + (t * nblk + k) * 32));
                            const __m256i p = _mm256_madd_epi16(
                                _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w)), ones);
                            acc[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                                     _mm256_set1_ps(xs[t * nblk + k] * sg), acc[q]);
                        }
                    }
                    for (int q = 0; q < nt; ++q) y[(t0 + q) * rows + r] = hsum(acc[q]);
                }
                continue;
            }
#endif
            unpack_row_scalar<BITS>(row, trow, nblk, gsb, wbuf.data());
            for (int64_t t = 0; t < b; ++t) {
                const int8_t* xt = xq.data() + t * nblk * 32;
                const float* st = xs.data() + t * nblk;
                float acc = 0.0f;
                for (int64_t k = 0; k < nblk; ++k)
                    acc += (float)dot32_scalar(wbuf.data() + k * 32, xt + k * 32) *
                           (st[k] * srow[k / gsb]);
                y[t * rows + r] = acc;
            }
        }
    });
}

// int8 levels, fp32 activations (benchmark comparison for hwq_q8): same layout and
// arguments; y = sum over blocks of scale_table * sum_j x[j] * int8level[j].
template <int BITS>
static void f32a_impl(const float* x, int64_t b, int64_t cols, const uint8_t* idx,
                      int64_t rows, const int8_t* tq, const float* ts, int64_t ng, float* y,
                      int threads) {
    constexpr int64_t BB = 4 * BITS;
    const int64_t nblk = (cols + 31) / 32;
    const int64_t gsb = ng == 1 ? nblk : (cols / ng) / 32;
    const int64_t cpad = nblk * 32;
    std::vector<float> xp(b * cpad, 0.0f);  // padded copy: whole blocks, zeros past cols
    for (int64_t t = 0; t < b; ++t) std::memcpy(xp.data() + t * cpad, x + t * cols, cols * 4);
    hwq_parallel(rows, threads, [&](int64_t r_begin, int64_t r_end) {
        std::vector<int8_t> wbuf(nblk * 32);
        for (int64_t r = r_begin; r < r_end; ++r) {
            const uint8_t* row = idx + r * nblk * BB;
            const int8_t* trow = tq + r * ng * 16;
            const float* srow = ts + r * ng;
#if defined(__AVX2__)
            for (int64_t k = 0; k < nblk; ++k) {
                const __m256i tab = load_table(trow + (k / gsb) * 16);
                _mm256_storeu_si256((__m256i*)(wbuf.data() + k * 32),
                                    lookup32<BITS>(tab, row + k * BB));
            }
            for (int64_t t = 0; t < b; ++t) {
                const float* xt = xp.data() + t * cpad;
                __m256 acc = _mm256_setzero_ps();
                for (int64_t k = 0; k < nblk; ++k) {
                    __m256 a = _mm256_setzero_ps();
                    for (int q = 0; q < 4; ++q) {
                        const __m128i w8 = _mm_loadl_epi64((const __m128i*)(wbuf.data() + k * 32 + q * 8));
                        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w8)),
                                            _mm256_loadu_ps(xt + k * 32 + q * 8), a);
                    }
                    acc = _mm256_fmadd_ps(a, _mm256_set1_ps(srow[k / gsb]), acc);
                }
                y[t * rows + r] = hsum(acc);
            }
#else
            unpack_row_scalar<BITS>(row, trow, nblk, gsb, wbuf.data());
            for (int64_t t = 0; t < b; ++t) {
                const float* xt = xp.data() + t * cpad;
                float acc = 0.0f;
                for (int64_t k = 0; k < nblk; ++k) {
                    float a = 0.0f;
                    for (int j = 0; j < 32; ++j) a += xt[k * 32 + j] * (float)wbuf[k * 32 + j];
                    acc += a * srow[k / gsb];
                }
                y[t * rows + r] = acc;
            }
#endif
        }
    });
}

}  // extern "C++"

// The exported entry points: bits 2, 3 or 4 (anything else is taken as 4).
void hwq_q8(const float* x, int64_t b, int64_t cols, const uint8_t* idx, int64_t rows,
            int bits, const int8_t* tq, const float* ts, int64_t ng, float* y, int threads,
            int scalar) {
    if (bits == 2) q8_impl<2>(x, b, cols, idx, rows, tq, ts, ng, y, threads, scalar);
    else if (bits == 3) q8_impl<3>(x, b, cols, idx, rows, tq, ts, ng, y, threads, scalar);
    else q8_impl<4>(x, b, cols, idx, rows, tq, ts, ng, y, threads, scalar);
}

void hwq_f32a(const float* x, int64_t b, int64_t cols, const uint8_t* idx, int64_t rows,
              int bits, const int8_t* tq, const float* ts, int64_t ng, float* y, int threads) {
    if (bits == 2) f32a_impl<2>(x, b, cols, idx, rows, tq, ts, ng, y, threads);
    else if (bits == 3) f32a_impl<3>(x, b, cols, idx, rows, tq, ts, ng, y, threads);
    else f32a_impl<4>(x, b, cols, idx, rows, tq, ts, ng, y, threads);
}

}  // extern "C"
