/* kapify's CPU Gaussian noise: out[e] = x[e] + sigma * z[e], z i.i.d. N(0, 1), in one pass.
 *
 * z[e] depends only on (seed, e): a counter-based generator (Philox4x32-10, Salmon et al. 2011, the
 * generator of cuRAND and JAX) keyed by the seed, its counter the element's index, and the Box-Muller
 * transform of its output. So any slicing of [0, n) across threads gives the same numbers, and the
 * loops below vectorise (gcc -O3 -ffast-math uses glibc's libmvec for logf/sinf/cosf).
 *
 * Elements are processed in blocks of 4 * LANES: counter c = block_start / 4 + i (i < LANES) gives
 * four uint32 words; words 0, 1 and 2, 3 make two Box-Muller pairs, written to the elements
 * block_start + s * LANES + i for slot s = 0..3 (contiguous runs, so the stores vectorise too).
 *
 * Built and loaded by kapify/layers/fast_noise.py with the machine's C compiler.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 64
#define BLOCK (4 * LANES)

static void philox_normals(uint64_t first_counter, uint64_t seed, float z[4][LANES]) {
    uint32_t c0[LANES], c1[LANES], c2[LANES], c3[LANES];
    for (int i = 0; i < LANES; i++) {
        uint64_t c = first_counter + (uint64_t)i;
        c0[i] = (uint32_t)c;
        c1[i] = (uint32_t)(c >> 32);
        c2[i] = 0;
        c3[i] = 0;
    }
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int round = 0; round < 10; round++) {
        for (int i = 0; i < LANES; i++) {
            uint64_t p0 = (uint64_t)0xD2511F53u * c0[i];
            uint64_t p1 = (uint64_t)0xCD9E8D57u * c2[i];
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[i] ^ k0;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3[i] ^ k1;
            c1[i] = (uint32_t)p1;
            c3[i] = (uint32_t)p0;
            c0[i] = n0;
            c2[i] = n2;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    const float two_pow_m32 = 2.3283064365386963e-10f, two_pi = 6.2831853071795865f,
                half_pi = 1.5707963267948966f;
    for (int i = 0; i < LANES; i++) {
        /* u1 in (0, 1]: never 0, so the log is finite; the largest |z| is sqrt(-2 log(2^-33)) = 6.8 */
        float u1 = ((float)c0[i] + 0.5f) * two_pow_m32;
        float u2 = (float)c1[i] * two_pow_m32;
        float v1 = ((float)c2[i] + 0.5f) * two_pow_m32;
        float v2 = (float)c3[i] * two_pow_m32;
        float r = sqrtf(-2.0f * logf(u1 > 1.0f ? 1.0f : u1));
        float s = sqrtf(-2.0f * logf(v1 > 1.0f ? 1.0f : v1));
        /* sin(t) as cos(t - pi/2): gcc would fuse sinf and cosf of one angle into sincosf, which has no
           vector variant, and the loop would stay scalar */
        z[0][i] = r * cosf(two_pi * u2);
        z[1][i] = r * cosf(two_pi * u2 - half_pi);
        z[2][i] = s * cosf(two_pi * v2);
        z[3][i] = s * cosf(two_pi * v2 - half_pi);
    }
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return (bits & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)((bits >> 16) | 0x40u) : (uint16_t)rounded;
}

/* The blocks overlapping [start, end), split across `threads` OpenMP threads (built with -fopenmp, the
   library shares the OpenMP runtime torch loaded, libgomp.so.1, and so its thread pool); for each block
   its normals z, then the elements of the block inside the range. */
#define FOR_EACH_BLOCK(BODY)                                                                        \
    int64_t first = start / BLOCK, last = (end + BLOCK - 1) / BLOCK;                                \
    _Pragma("omp parallel for num_threads(threads) schedule(static) if(threads > 1 && last - first >= 64)") \
    for (int64_t b = first; b < last; b++) {                                                        \
        float z[4][LANES];                                                                          \
        int64_t block = b * BLOCK;                                                                  \
        philox_normals((uint64_t)block / 4, seed, z);                                               \
        int64_t lo = block < start ? start : block, hi = block + BLOCK > end ? end : block + BLOCK; \
        const float *flat = &z[0][0];                                                               \
        for (int64_t e = lo; e < hi; e++) {                                                         \
            float noise = sigma * flat[e - block];                                                  \
            BODY                                                                                    \
        }                                                                                           \
    }

/* out[e] = x[e] + sigma * z[e] for e in [start, end) (x may be NULL: out[e] = sigma * z[e]) */
void kap_add_normal_f32(const float *x, float *out, int64_t start, int64_t end, float sigma, uint64_t seed, int threads) {
    FOR_EACH_BLOCK(out[e] = (x ? x[e] : 0.0f) + noise;)
}

void kap_add_normal_bf16(const uint16_t *x, uint16_t *out, int64_t start, int64_t end, float sigma, uint64_t seed,
                         int threads) {
    FOR_EACH_BLOCK(out[e] = float_to_bf16((x ? bf16_to_float(x[e]) : 0.0f) + noise);)
}
