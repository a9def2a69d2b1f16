/* Memory read-bandwidth probe: the ceiling for memory-bound decoding.
 *
 * Sums a 1 GiB buffer with T threads (default 2), several passes, and prints the
 * best pass in GB/s (1e9 bytes/s) as one number on stdout; details on stderr.
 *
 *   gcc -O2 -march=native -fopenmp bench/bandwidth.c -o target/bench/bandwidth
 *   target/bench/bandwidth [threads] [MiB] [passes]
 */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef uint64_t v8u64 __attribute__((vector_size(64)));

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    size_t mib = argc > 2 ? (size_t)atol(argv[2]) : 1024;
    int passes = argc > 3 ? atoi(argv[3]) : 8;
    if (threads < 1 || mib < 1 || passes < 1) {
        fprintf(stderr, "usage: %s [threads>=1] [MiB>=1] [passes>=1]\n", argv[0]);
        return 2;
    }
    size_t bytes = mib << 20;
    size_t nvec = bytes / sizeof(v8u64);
    v8u64 *buf = aligned_alloc(4096, nvec * sizeof(v8u64));
    if (!buf) {
        fprintf(stderr, "cannot allocate %zu MiB\n", mib);
        return 1;
    }
    omp_set_num_threads(threads);

    /* First touch by the thread that will read each part. */
#pragma omp parallel
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        size_t lo = nvec * t / n, hi = nvec * (t + 1) / n;
        memset((char *)(buf + lo), t + 1, (hi - lo) * sizeof(v8u64));
    }

    double best = 1e30;
    uint64_t checksum = 0;
    for (int p = 0; p < passes; p++) {
        uint64_t total = 0;
        double t0 = now();
#pragma omp parallel reduction(+ : total)
        {
            int t = omp_get_thread_num(), n = omp_get_num_threads();
            size_t lo = nvec * t / n, hi = nvec * (t + 1) / n;
            v8u64 a = {0}, b = {0}, c = {0}, d = {0};
            size_t i = lo;
            for (; i + 4 <= hi; i += 4) {
                a += buf[i];
                b += buf[i + 1];
                c += buf[i + 2];
                d += buf[i + 3];
            }
            for (; i < hi; i++) a += buf[i];
            a += b + c + d;
            for (int k = 0; k < 8; k++) total += a[k];
        }
        double dt = now() - t0;
        checksum += total;
        if (dt < best) best = dt;
        fprintf(stderr, "pass %d: %.2f GB/s\n", p, bytes / dt / 1e9);
    }
    fprintf(stderr, "threads=%d size=%zu MiB passes=%d best=%.2f GB/s (checksum %llx)\n",
            threads, mib, passes, bytes / best / 1e9, (unsigned long long)checksum);
    printf("%.2f\n", bytes / best / 1e9);
    free(buf);
    return 0;
}
