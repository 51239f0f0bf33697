// Lookup-table GEMV/GEMM over packed indices (docs/RUNTIME.md).
//
//   y[t, r] = sum_c x[t, c] * W[r, c],   W[r, c] = table[r * ng + c / gs][idx[r, c]]
//
// Packed indices, one row after another, `stride` bytes a row:
//   4 bits: blocks of 32 columns in 16 bytes; byte j of a block holds column j in its low
//           nibble and column j + 16 in its high nibble (so one 128-bit load, a mask and a
//           shift give the 32 indices in order); the last block is padded with index 0.
//   8 bits: one byte a column.
// Tables: float32 [rows * ng, L] (reference path) or int8 [rows * ng, 16] with one float32
// scale a table (fast path: level ~= scale * int8).
//
// Three paths:
//   hwq_ref   fp32 levels, fp32 activations, fp32 accumulation in column order (exact
//             reference; 4 or 8 bits; any group size).
//   hwq_q8    int8 levels (per-table scale), int8 activations (per 32-column block scale),
//             exact int32 block sums, fp32 accumulation of the scaled block sums; 4 bits,
//             gs a multiple of 32 or gs == cols. AVX2 (vpshufb table lookups) when compiled
//             for it, else a portable scalar loop computing the same block sums.
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

int hwq_abi_version() { return 1; }

int hwq_has_avx2() {
#if defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

// uint8 [rows, cols] indices (< 16) -> the 4-bit layout, uint8 [rows, nblk * 16].
void hwq_pack4(const uint8_t* full, int64_t rows, int64_t cols, uint8_t* out, int threads) {
    const int64_t nblk = (cols + 31) / 32;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* in = full + r * cols;
        uint8_t* o = out + r * nblk * 16;
        int64_t k = 0;
        for (; (k + 1) * 32 <= cols; ++k)
            for (int j = 0; j < 16; ++j)
                o[k * 16 + j] = (uint8_t)(in[k * 32 + j] | (in[k * 32 + 16 + j] << 4));
        for (; k < nblk; ++k)
            for (int j = 0; j < 16; ++j) {
                const int64_t c0 = k * 32 + j, c1 = c0 + 16;
                o[k * 16 + j] = (uint8_t)((c0 < cols ? in[c0] : 0) | ((c1 < cols ? in[c1] : 0) << 4));
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
    const uint8_t b = row[(c >> 5) * 16 + (c & 15)];
    return (c & 16) ? (b >> 4) : (b & 15);
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

#if defined(__AVX2__)
static inline __m256i unpack32(const uint8_t* p) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i v = _mm_loadu_si128((const __m128i*)p);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
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

static inline void unpack_row_scalar(const uint8_t* row, const int8_t* tq, int64_t nblk,
                                     int64_t gsb, int8_t* out) {
    for (int64_t k = 0; k < nblk; ++k) {
        const int8_t* tab = tq + (k / gsb) * 16;
        for (int j = 0; j < 16; ++j) {
            const uint8_t v = row[k * 16 + j];
            out[k * 32 + j] = tab[v & 15];
            out[k * 32 + 16 + j] = tab[v >> 4];
        }
    }
}

// Fast path. x fp32 [b, cols]; idx 4-bit [rows, nblk * 16]; tq int8 [rows * ng, 16];
// ts fp32 [rows * ng]; gs = cols / ng (a multiple of 32 unless ng == 1); y fp32 [b, rows].
// scalar != 0 forces the portable loop (tests compare the two).
void hwq_q8(const float* x, int64_t b, int64_t cols, const uint8_t* idx, int64_t rows,
            const int8_t* tq, const float* ts, int64_t ng, float* y, int threads, int scalar) {
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
            const uint8_t* row = idx + r * nblk * 16;
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
                        const __m256i w0 = _mm256_shuffle_epi8(tab, unpack32(row + k * 16));
                        const __m256i w1 = _mm256_shuffle_epi8(tab, unpack32(row + k * 16 + 16));
                        const __m256i s0 = dot32(w0, _mm256_loadu_si256((const __m256i*)(xq.data() + k * 32)));
                        const __m256i s1 = dot32(w1, _mm256_loadu_si256((const __m256i*)(xq.data() + k * 32 + 32)));
                        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_set1_ps(xs[k] * sg), acc0);
                        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_set1_ps(xs[k + 1] * sg), acc1);
                    }
                    if (k < k1) {
                        const __m256i w0 = _mm256_shuffle_epi8(tab, unpack32(row + k * 16));
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
                                        _mm256_shuffle_epi8(tab, unpack32(row + k * 16)));
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
            unpack_row_scalar(row, trow, nblk, gsb, wbuf.data());
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
void hwq_f32a(const float* x, int64_t b, int64_t cols, const uint8_t* idx, int64_t rows,
              const int8_t* tq, const float* ts, int64_t ng, float* y, int threads) {
    const int64_t nblk = (cols + 31) / 32;
    const int64_t gsb = ng == 1 ? nblk : (cols / ng) / 32;
    const int64_t cpad = nblk * 32;
    std::vector<float> xp(b * cpad, 0.0f);  // padded copy: whole blocks, zeros past cols
    for (int64_t t = 0; t < b; ++t) std::memcpy(xp.data() + t * cpad, x + t * cols, cols * 4);
    hwq_parallel(rows, threads, [&](int64_t r_begin, int64_t r_end) {
        std::vector<int8_t> wbuf(nblk * 32);
        for (int64_t r = r_begin; r < r_end; ++r) {
            const uint8_t* row = idx + r * nblk * 16;
            const int8_t* trow = tq + r * ng * 16;
            const float* srow = ts + r * ng;
#if defined(__AVX2__)
            for (int64_t k = 0; k < nblk; ++k) {
                const __m256i tab = load_table(trow + (k / gsb) * 16);
                _mm256_storeu_si256((__m256i*)(wbuf.data() + k * 32),
                                    _mm256_shuffle_epi8(tab, unpack32(row + k * 16)));
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
            unpack_row_scalar(row, trow, nblk, gsb, wbuf.data());
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

}  // extern "C"
