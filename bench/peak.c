/* Arithmetic-peak probe: what one core's vector units sustain, the ceiling for
 * compute-bound (batched) decoding, next to bench/bandwidth.c's memory ceiling.
 *
 * Ten independent chains (more than latency × ports, so throughput, not latency,
 * is measured) of 512-bit FMA (f32, 16 multiply-adds each) and of VNNI
 * vpdpbusd (64 byte multiply-adds each), on one thread. Prints
 * "FMA_G_PER_S VNNI_G_PER_S" (instructions per second, best of 3) on stdout;
 * "nan" for VNNI where the CPU lacks it. Needs AVX-512 F.
 *
 *   gcc -O2 -march=native bench/peak.c -o target/bench/peak && target/bench/peak
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The asm statement makes every chain's value live each round, so nothing is
 * folded away or moved out of the loop. */
#define KEEP10(a) __asm__ volatile("" ::"v"(a##0), "v"(a##1), "v"(a##2), "v"(a##3), "v"(a##4), \
                                   "v"(a##5), "v"(a##6), "v"(a##7), "v"(a##8), "v"(a##9))

static double fma_rate(long rounds) {
    __m512 x = _mm512_set1_ps(0.9999f), y = _mm512_set1_ps(1e-4f);
    /* Ten different starting values: chains that start equal compute equal
     * values, and the compiler keeps one of them (it ran 2 chains, not 10, and
     * this probe reported five times the real rate). */
    __m512 a0 = _mm512_set1_ps(0.0f), a1 = _mm512_set1_ps(1.0f), a2 = _mm512_set1_ps(2.0f),
           a3 = _mm512_set1_ps(3.0f), a4 = _mm512_set1_ps(4.0f), a5 = _mm512_set1_ps(5.0f),
           a6 = _mm512_set1_ps(6.0f), a7 = _mm512_set1_ps(7.0f), a8 = _mm512_set1_ps(8.0f),
           a9 = _mm512_set1_ps(9.0f);
    double t = now();
    for (long n = 0; n < rounds; n++) {
        a0 = _mm512_fmadd_ps(a0, x, y); a1 = _mm512_fmadd_ps(a1, x, y);
        a2 = _mm512_fmadd_ps(a2, x, y); a3 = _mm512_fmadd_ps(a3, x, y);
        a4 = _mm512_fmadd_ps(a4, x, y); a5 = _mm512_fmadd_ps(a5, x, y);
        a6 = _mm512_fmadd_ps(a6, x, y); a7 = _mm512_fmadd_ps(a7, x, y);
        a8 = _mm512_fmadd_ps(a8, x, y); a9 = _mm512_fmadd_ps(a9, x, y);
        KEEP10(a);
    }
    return 10.0 * rounds / (now() - t);
}

#ifdef __AVX512VNNI__
static double vnni_rate(long rounds) {
    __m512i w = _mm512_set1_epi8(3), v = _mm512_set1_epi8(5);
    __m512i c0 = _mm512_set1_epi32(0), c1 = _mm512_set1_epi32(1), c2 = _mm512_set1_epi32(2),
            c3 = _mm512_set1_epi32(3), c4 = _mm512_set1_epi32(4), c5 = _mm512_set1_epi32(5),
            c6 = _mm512_set1_epi32(6), c7 = _mm512_set1_epi32(7), c8 = _mm512_set1_epi32(8),
            c9 = _mm512_set1_epi32(9);
    double t = now();
    for (long n = 0; n < rounds; n++) {
        c0 = _mm512_dpbusd_epi32(c0, w, v); c1 = _mm512_dpbusd_epi32(c1, w, v);
        c2 = _mm512_dpbusd_epi32(c2, w, v); c3 = _mm512_dpbusd_epi32(c3, w, v);
        c4 = _mm512_dpbusd_epi32(c4, w, v); c5 = _mm512_dpbusd_epi32(c5, w, v);
        c6 = _mm512_dpbusd_epi32(c6, w, v); c7 = _mm512_dpbusd_epi32(c7, w, v);
        c8 = _mm512_dpbusd_epi32(c8, w, v); c9 = _mm512_dpbusd_epi32(c9, w, v);
        KEEP10(c);
    }
    return 10.0 * rounds / (now() - t);
}
#endif

int main(void) {
    const long rounds = 20000000;
    double fma = 0, vnni = 0;
    for (int pass = 0; pass < 3; pass++) {
        double f = fma_rate(rounds);
        if (f > fma) fma = f;
#ifdef __AVX512VNNI__
        double v = vnni_rate(rounds);
        if (v > vnni) vnni = v;
#endif
    }
    fprintf(stderr, "one thread: %.2f G FMA/s (%.0f G f32 multiply-adds/s)", fma / 1e9, 16 * fma / 1e9);
#ifdef __AVX512VNNI__
    fprintf(stderr, ", %.2f G vpdpbusd/s (%.0f G byte multiply-adds/s)\n", vnni / 1e9, 64 * vnni / 1e9);
    printf("%.3f %.3f\n", fma / 1e9, vnni / 1e9);
#else
    fprintf(stderr, "; no VNNI\n");
    printf("%.3f nan\n", fma / 1e9);
#endif
    return 0;
}
