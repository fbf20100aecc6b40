/*
 * A reference contender of scripts/bench-throughput.sh and bench-instructions.sh
 * ("ovh-bare"), not a balancer, and not rsbalancer: the least per-response feedback
 * any balancer sharing its state between nginx workers can have. A weighted random
 * draw, an in-flight count per node and a decaying latency average per node, in one
 * anonymous shared mapping made by the nginx master before it forks its workers.
 * No locks: one atomic add per pick, one atomic sub and one CAS loop per report.
 * What it costs above the floor (a balancer_by_lua that only sets a peer, plus an
 * empty log_by_lua) bounds what shared-memory feedback costs by itself.
 *
 * Built by scripts/bench-overhead-setup.sh: gcc -O2 -shared -fPIC ... -lm
 * Used through benches/nginx/bare_feedback.lua (LuaJIT FFI).
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* Decay time constant of the latency average, in milliseconds. */
#define TAU_MS 10000.0

/* One node, alone on its cache line: workers updating different nodes do not
 * contend for the same line. */
struct node {
    uint32_t inflight; /* atomic: picks not yet reported */
    uint32_t weight;   /* set once by bare_init, read-only after */
    /* atomic, one CAS word: the high 32 bits are the millisecond stamp of the last
     * update (CLOCK_MONOTONIC_COARSE, wrapping: only differences are used), the low
     * 32 bits the bits of a float, the average latency in microseconds. 0: no sample
     * yet. */
    uint64_t ewma;
} __attribute__((aligned(64)));

/* Set by bare_init in the master, inherited by every worker on fork. */
static struct node *nodes;
static uint32_t count;
static uint64_t total_weight;

/* Per process: the RNG state (splitmix64). 0 until the first pick, which seeds it;
 * the master never picks, so every worker seeds its own after the fork. */
static uint64_t rng;

/* n nodes with their weights. Returns 0, or -1 (no node, weights summing to 0 or
 * over 2^32 - 1, or no memory). Call it once, before the workers fork. */
int bare_init(unsigned n, const unsigned *weights)
{
    uint64_t sum = 0;
    unsigned i;
    void *p;

    if (n == 0 || nodes)
        return -1;
    for (i = 0; i < n; i++)
        sum += weights[i];
    if (sum == 0 || sum > UINT32_MAX)
        return -1;
    p = mmap(NULL, (size_t)n * sizeof(struct node), PROT_READ | PROT_WRITE,
             MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return -1;
    nodes = p; /* zeroed by the kernel: nothing in flight, no sample */
    for (i = 0; i < n; i++)
        nodes[i].weight = weights[i];
    count = n;
    total_weight = sum;
    return 0;
}

static uint64_t next_random(void)
{
    uint64_t z;

    if (rng == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        rng = ((uint64_t)getpid() << 32) ^ (uint64_t)ts.tv_sec * 1000000000u ^
              (uint64_t)ts.tv_nsec;
    }
    z = (rng += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

/* A node drawn with probability weight / total, counted in flight. Returns its index
 * (0 .. n-1). bare_init must have succeeded. */
unsigned bare_pick(void)
{
    /* Uniform in [0, total): the high 32 random bits scaled by the total. */
    uint64_t r = ((next_random() >> 32) * total_weight) >> 32;
    unsigned i;

    for (i = 0; i + 1 < count; i++) {
        if (r < nodes[i].weight)
            break;
        r -= nodes[i].weight;
    }
    __atomic_fetch_add(&nodes[i].inflight, 1, __ATOMIC_RELAXED);
    return i;
}

static uint32_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint32_t)((uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}

/* The answer of a pick of node: no longer in flight, and its latency fed into the
 * node's average. The status is not used (any answer counts as a latency sample). */
void bare_report(unsigned node, unsigned status, unsigned latency_us)
{
    uint64_t old, next;
    uint32_t now, stamp;
    union { float f; uint32_t u; } cost;
    float sample = (float)latency_us;

    (void)status;
    if (node >= count)
        return;
    __atomic_fetch_sub(&nodes[node].inflight, 1, __ATOMIC_RELAXED);
    now = now_ms();
    old = __atomic_load_n(&nodes[node].ewma, __ATOMIC_RELAXED);
    do {
        if (old == 0) {
            cost.f = sample; /* the first sample is the average */
        } else {
            stamp = (uint32_t)(old >> 32);
            cost.u = (uint32_t)old;
            /* Weight of the old average: exp(-dt / tau). Samples within the same
             * tick of the coarse clock (dt 0) leave it as it is, as in the usual
             * time-decayed ("peak") EWMA. */
            if (now != stamp) {
                double w = exp(-(double)(uint32_t)(now - stamp) / TAU_MS);
                cost.f = (float)(cost.f * w + sample * (1.0 - w));
            }
        }
        next = ((uint64_t)now << 32) | cost.u;
        if (next == 0)
            next = 1; /* keep 0 for "no sample" */
    } while (!__atomic_compare_exchange_n(&nodes[node].ewma, &old, next, 1,
                                          __ATOMIC_RELAXED, __ATOMIC_RELAXED));
}
