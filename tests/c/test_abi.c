/* C ABI tests for rsbalancer (include/rsbalancer.h), run by scripts/test-c.sh under
 * valgrind. Ends with exactly one line "N passed, M failed" on stdout and exits 1
 * when M > 0. Children of fork() never touch the pass/fail counters: they report
 * through their exit status, which the parent checks. */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "rsbalancer.h"

static enum rsb_result node_stats(const struct rsb_balancer *b, uint32_t node,
                                  struct rsb_node_stats *out) {
    return rsb_node_get_stats(b, node, out);
}

/* ---------------------------------------------------------------- harness */

static unsigned g_passed;
static unsigned g_failed;

static void check_failed(const char *expr, const char *file, int line) {
    char err[512];
    rsb_last_error(err, sizeof err);
    g_failed++;
    printf("FAIL %s:%d: %s  (last rsb error, may be older: \"%s\")\n", file, line, expr, err);
    fflush(stdout);
}

#define CHECK(expr)                                         \
    do {                                                    \
        if (expr) {                                         \
            g_passed++;                                     \
        } else {                                            \
            check_failed(#expr, __FILE__, __LINE__);        \
        }                                                   \
    } while (0)

/* Like CHECK(a == b) for result codes, printing both values on failure. */
#define CHECK_RC(call, want)                                                   \
    do {                                                                       \
        enum rsb_result rc_ = (call);                                          \
        if (rc_ == (want)) {                                                   \
            g_passed++;                                                        \
        } else {                                                               \
            char what_[768];                                                   \
            snprintf(what_, sizeof what_, "%s == %s (got %d, want %d)", #call, \
                     #want, (int)rc_, (int)(want));                            \
            check_failed(what_, __FILE__, __LINE__);                           \
        }                                                                      \
    } while (0)

static void section(const char *name) {
    printf("== %s\n", name);
    fflush(stdout);
}

/* The last error message of this thread (static buffer). */
static const char *last_error(void) {
    static char buf[1024];
    rsb_last_error(buf, sizeof buf);
    return buf;
}

/* ---------------------------------------------------------------- helpers */

/* Small regions: valgrind runs faster and attach/detach loops stay short. */
#define SHM "\"shm\":{\"max_nodes\":16,\"max_pools\":4,\"max_workers\":8,\"config_bytes\":4096}"

/* Two pools; "chat" has a backup node. */
static const char CFG_MAIN[] =
    "{" SHM ",\"pools\":{"
    "\"chat\":{\"algorithm\":\"weighted_random\",\"slow_start_ms\":0,\"nodes\":["
    "{\"id\":\"a\",\"addr\":\"127.0.0.1:8001\",\"weight\":1},"
    "{\"id\":\"b\",\"addr\":\"127.0.0.1:8002\",\"weight\":3},"
    "{\"id\":\"spare\",\"addr\":\"127.0.0.1:8009\",\"backup\":true}]},"
    "\"embed\":{\"nodes\":["
    "{\"id\":\"e1\",\"addr\":\"127.0.0.1:9001\"},"
    "{\"id\":\"e2\",\"addr\":\"127.0.0.1:9002\",\"weight\":2}]}"
    "}}";

static struct rsb_balancer *new_balancer(const char *json) {
    struct rsb_balancer *b = NULL;
    CHECK_RC(rsb_balancer_new(json, strlen(json), &b), RSB_OK);
    CHECK(b != NULL);
    return b;
}

static uint32_t pool_of(const struct rsb_balancer *b, const char *name) {
    uint32_t i = UINT32_MAX;
    CHECK_RC(rsb_pool_index(b, name, strlen(name), &i), RSB_OK);
    return i;
}

static uint32_t node_of(const struct rsb_balancer *b, const char *pool, const char *id) {
    uint32_t i = UINT32_MAX;
    CHECK_RC(rsb_node_index(b, pool, strlen(pool), id, strlen(id), &i), RSB_OK);
    return i;
}

static struct rsb_node_stats stats_of(const struct rsb_balancer *b, uint32_t node) {
    struct rsb_node_stats s;
    memset(&s, 0, sizeof s);
    CHECK_RC(node_stats(b, node, &s), RSB_OK);
    return s;
}

/* Sum of a counter over node slots [0, n) that are live (others are skipped). */
struct totals {
    uint64_t picks, requests, inflight;
};

static struct totals totals_of(const struct rsb_balancer *b, uint32_t max_nodes) {
    struct totals t = {0, 0, 0};
    for (uint32_t i = 0; i < max_nodes; i++) {
        struct rsb_node_stats s;
        if (node_stats(b, i, &s) == RSB_OK) {
            t.picks += s.picks;
            t.requests += s.requests;
            t.inflight += s.inflight;
        }
    }
    return t;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ------------------------------------------------ 1. lifecycle and basics */

static void test_basics(void) {
    section("1. create / pool_index / pick / report / node_stats / set_weight / free");

    const char *v = rsb_version();
    CHECK(v != NULL);
    CHECK(v != NULL && strlen(v) > 0);

    rsb_balancer_free(NULL); /* no-op, must not crash */
    CHECK(rsb_generation(NULL) == 0);

    struct rsb_balancer *b = new_balancer(CFG_MAIN);
    if (!b) return;
    uint64_t gen0 = rsb_generation(b);
    CHECK(gen0 != 0);
    CHECK(rsb_generation_word(NULL) == NULL);
    const uint64_t *gen_word = rsb_generation_word(b);
    CHECK(gen_word != NULL && *gen_word == gen0);

    uint32_t chat = pool_of(b, "chat");
    uint32_t embed = pool_of(b, "embed");
    CHECK(chat != embed);
    CHECK(chat < 4 && embed < 4);

    uint32_t na = node_of(b, "chat", "a");
    uint32_t nb = node_of(b, "chat", "b");
    uint32_t ns = node_of(b, "chat", "spare");
    uint32_t e1 = node_of(b, "embed", "e1");
    uint32_t e2 = node_of(b, "embed", "e2");
    CHECK(na != nb && na != ns && nb != ns);
    CHECK(e1 != e2 && e1 != na && e1 != nb && e1 != ns && e2 != na && e2 != nb && e2 != ns);
    CHECK(na < 16 && nb < 16 && ns < 16 && e1 < 16 && e2 < 16);

    /* Initial stats: weights from the config, nothing counted yet. */
    struct rsb_node_stats sa = stats_of(b, na), sb = stats_of(b, nb), ss = stats_of(b, ns);
    CHECK(sa.weight == 1);
    CHECK(sb.weight == 3);
    CHECK(ss.weight == 1);
    CHECK(stats_of(b, e2).weight == 2);
    CHECK(sa.backup == 0 && sb.backup == 0);
    CHECK(ss.backup != 0);
    CHECK(sa.inflight == 0 && sa.picks == 0 && sa.requests == 0 && sa.failures == 0);
    CHECK(sa.busy == 0 && sa.latency_sum_us == 0 && sa.ewma_us == 0.0);

    /* pick raises inflight and picks of a primary; report brings inflight back. */
    uint32_t n = UINT32_MAX;
    CHECK_RC(rsb_pick(b, chat, NULL, 0, NULL, 0, &n), RSB_OK);
    CHECK(n == na || n == nb); /* a primary, never the backup */
    struct rsb_node_stats s = stats_of(b, n);
    CHECK(s.inflight == 1);
    CHECK(s.picks == 1);
    CHECK(s.requests == 0);
    CHECK_RC(rsb_report(b, n, 200, 1500, 0), RSB_OK);
    s = stats_of(b, n);
    CHECK(s.inflight == 0);
    CHECK(s.picks == 1);
    CHECK(s.requests == 1);
    CHECK(s.failures == 0);
    CHECK(s.latency_sum_us == 1500);
    CHECK(s.ewma_us > 0.0);

    /* A key is accepted (and ignored) by non-chash algorithms. */
    CHECK_RC(rsb_pick(b, embed, "user-42", 7, NULL, 0, &n), RSB_OK);
    CHECK(n == e1 || n == e2);
    CHECK_RC(rsb_report(b, n, 503, 100, 0), RSB_OK); /* failure */
    s = stats_of(b, n);
    CHECK(s.failures == 1 && s.requests == 1 && s.inflight == 0);
    CHECK(s.latency_sum_us == 0); /* failures are not latency samples */

    /* rsb_pick_prefer: probe slots first (RSB_PREFER_PROBE) finds none here (no
     * learned limits), so it takes a confirmed one like rsb_pick; "not slow only"
     * (RSB_PREFER_NOT_SLOW) finds any node (equal latencies: none is slow); other bits
     * are refused. rsb_slow_wait: 0, nothing
     * to wait for. */
    CHECK_RC(rsb_pick_prefer(b, chat, NULL, 0, NULL, 0, RSB_PREFER_PROBE, &n), RSB_OK);
    CHECK(n == na || n == nb);
    CHECK(stats_of(b, n).inflight == 1);
    CHECK_RC(rsb_report(b, n, 200, 1500, 0), RSB_OK);
    uint32_t before = n;
    CHECK_RC(rsb_pick_prefer(b, chat, NULL, 0, NULL, 0, RSB_PREFER_NOT_SLOW, &n), RSB_OK);
    CHECK(n == na || n == nb);
    CHECK_RC(rsb_report(b, n, 200, 1500, 0), RSB_OK);
    before = n;
    CHECK_RC(rsb_pick_prefer(b, chat, NULL, 0, NULL, 0, RSB_PREFER_NOT_SLOW << 1, &n),
             RSB_INVALID_ARGUMENT);
    CHECK(n == before); /* nothing written */
    uint32_t wait_ms = UINT32_MAX, others = UINT32_MAX;
    CHECK_RC(rsb_slow_wait(b, chat, &wait_ms, &others), RSB_OK);
    CHECK(wait_ms == 0 && others == 0);
    CHECK_RC(rsb_slow_wait(b, chat, NULL, &others), RSB_NULL_ARGUMENT);
    CHECK_RC(rsb_slow_wait(b, chat, &wait_ms, NULL), RSB_NULL_ARGUMENT);
    CHECK_RC(rsb_slow_wait(b, 999, &wait_ms, &others), RSB_INVALID_ARGUMENT);
    CHECK_RC(rsb_pick_prefer(b, chat, NULL, 0, NULL, 0, 0, NULL), RSB_NULL_ARGUMENT);

    uint32_t m = UINT32_MAX;
    CHECK_RC(rsb_pick(b, embed, NULL, 0, NULL, 0, &m), RSB_OK);
    CHECK(m == e1 || m == e2);
    CHECK_RC(rsb_report(b, m, 429, 100, 2000), RSB_OK); /* busy */
    s = stats_of(b, m);
    CHECK(s.busy == 1 && s.inflight == 0);

    /* set_weight is visible in the stats and bumps the generation. */
    CHECK_RC(rsb_set_weight(b, na, 7), RSB_OK);
    CHECK(stats_of(b, na).weight == 7);
    CHECK(rsb_generation(b) > gen0);
    CHECK(*gen_word == rsb_generation(b)); /* the word follows the change */
    CHECK(RSB_WEIGHT_MIN == 1 && RSB_WEIGHT_MAX == 10000); /* the README's range */
    CHECK_RC(rsb_set_weight(b, na, RSB_WEIGHT_MAX), RSB_OK); /* upper bound accepted */
    CHECK(stats_of(b, na).weight == RSB_WEIGHT_MAX);
    CHECK_RC(rsb_set_weight(b, na, RSB_WEIGHT_MIN), RSB_OK); /* lower bound accepted */
    CHECK(stats_of(b, na).weight == 1);

    /* attach_worker: out_slot may be NULL; with a pointer it gets the slot. */
    uint32_t slot = UINT32_MAX;
    CHECK_RC(rsb_attach_worker(b, 2, &slot), RSB_OK);
    CHECK(slot == 2);
    CHECK_RC(rsb_attach_worker(b, 2, NULL), RSB_OK);

    rsb_balancer_free(b);
}

/* ------------------------------------------------------- 2. error codes */

static void test_errors(void) {
    section("2. error codes and rsb_last_error");

    /* NULL out pointer / NULL json. */
    CHECK_RC(rsb_balancer_new(CFG_MAIN, strlen(CFG_MAIN), NULL), RSB_NULL_ARGUMENT);
    CHECK(strstr(last_error(), "out") != NULL);
    struct rsb_balancer *none = NULL;
    CHECK_RC(rsb_balancer_new(NULL, 10, &none), RSB_NULL_ARGUMENT);
    CHECK(none == NULL);

    /* weight 0: RSB_CONFIG, the message names the field path and the value. */
    static const char bad_weight[] =
        "{" SHM ",\"pools\":{\"chat\":{\"nodes\":["
        "{\"id\":\"a\",\"addr\":\"127.0.0.1:8001\"},"
        "{\"id\":\"b\",\"addr\":\"127.0.0.1:8002\",\"weight\":0}]}}}";
    CHECK_RC(rsb_balancer_new(bad_weight, strlen(bad_weight), &none), RSB_CONFIG);
    CHECK(none == NULL); /* outputs are written only on success */
    CHECK(strstr(last_error(), "pools.chat.nodes[1].weight") != NULL);
    CHECK(strstr(last_error(), "weight") != NULL && strstr(last_error(), "0") != NULL);

    /* Unknown key: RSB_CONFIG naming it. */
    static const char bad_key[] =
        "{" SHM ",\"pools\":{\"chat\":{\"nodes\":["
        "{\"id\":\"a\",\"addr\":\"127.0.0.1:8001\",\"wieght\":2}]}}}";
    CHECK_RC(rsb_balancer_new(bad_key, strlen(bad_key), &none), RSB_CONFIG);
    CHECK(none == NULL);
    CHECK(strstr(last_error(), "wieght") != NULL);
    CHECK(strstr(last_error(), "pools.chat.nodes[0]") != NULL);

    static const char bad_top[] = "{\"pools\":{},\"extra\":1}";
    CHECK_RC(rsb_balancer_new(bad_top, strlen(bad_top), &none), RSB_CONFIG);
    CHECK(strstr(last_error(), "extra") != NULL);

    /* Not JSON at all, and not UTF-8. */
    CHECK_RC(rsb_balancer_new("{", 1, &none), RSB_CONFIG);
    CHECK(none == NULL);
    CHECK_RC(rsb_balancer_new("\xff\xfe", 2, &none), RSB_INVALID_ARGUMENT);
    CHECK(none == NULL);

    struct rsb_balancer *b = new_balancer(CFG_MAIN);
    if (!b) return;
    uint32_t chat = pool_of(b, "chat");
    uint32_t na = node_of(b, "chat", "a");

    /* NULL out / handle pointers. */
    CHECK_RC(rsb_pool_index(b, "chat", 4, NULL), RSB_NULL_ARGUMENT);
    CHECK_RC(rsb_pool_index(NULL, "chat", 4, &chat), RSB_NULL_ARGUMENT);
    CHECK_RC(rsb_pick(b, chat, NULL, 0, NULL, 0, NULL), RSB_NULL_ARGUMENT);
    CHECK_RC(rsb_pick(NULL, chat, NULL, 0, NULL, 0, &na), RSB_NULL_ARGUMENT);
    CHECK_RC(rsb_pick(b, chat, NULL, 0, NULL, 2, &na), RSB_NULL_ARGUMENT); /* tried NULL, ntried 2 */
    CHECK_RC(rsb_pick(b, chat, NULL, 3, NULL, 0, &na), RSB_NULL_ARGUMENT); /* key NULL, key_len 3 */
    CHECK_RC(node_stats(b, na, NULL), RSB_NULL_ARGUMENT);
    CHECK_RC(rsb_node_index(b, "chat", 4, "a", 1, NULL), RSB_NULL_ARGUMENT);
    CHECK_RC(rsb_report(NULL, na, 200, 1, 0), RSB_NULL_ARGUMENT);
    CHECK_RC(rsb_set_weight(NULL, na, 2), RSB_NULL_ARGUMENT);
    CHECK_RC(rsb_attach_worker(NULL, 0, NULL), RSB_NULL_ARGUMENT);
    CHECK_RC(rsb_configure(b, NULL, 5), RSB_NULL_ARGUMENT);
    CHECK(na == node_of(b, "chat", "a")); /* failed calls wrote nothing */
    CHECK(totals_of(b, 16).inflight == 0); /* and picked nothing */

    /* Unknown pool / node names. */
    uint32_t out = 12345;
    CHECK_RC(rsb_pool_index(b, "nope", 4, &out), RSB_INVALID_ARGUMENT);
    CHECK(out == 12345);
    CHECK(strstr(last_error(), "nope") != NULL);
    CHECK_RC(rsb_pool_index(b, "", 0, &out), RSB_INVALID_ARGUMENT);
    CHECK_RC(rsb_pool_index(b, "\xff", 1, &out), RSB_INVALID_ARGUMENT);
    CHECK_RC(rsb_node_index(b, "chat", 4, "zz", 2, &out), RSB_INVALID_ARGUMENT);
    CHECK(strstr(last_error(), "zz") != NULL);
    CHECK_RC(rsb_node_index(b, "nope", 4, "a", 1, &out), RSB_INVALID_ARGUMENT);
    CHECK(out == 12345);

    /* Pick with a bad pool index: past max_pools, and an unused slot below it. */
    CHECK_RC(rsb_pick(b, 99, NULL, 0, NULL, 0, &out), RSB_INVALID_ARGUMENT);
    CHECK_RC(rsb_pick(b, UINT32_MAX, NULL, 0, NULL, 0, &out), RSB_INVALID_ARGUMENT);
    CHECK_RC(rsb_pick(b, 3, NULL, 0, NULL, 0, &out), RSB_INVALID_ARGUMENT); /* 2 pools in 4 slots */
    CHECK(out == 12345);
    CHECK(totals_of(b, 16).picks == 0);

    /* set_weight out of range leaves the weight alone. */
    uint64_t gen = rsb_generation(b);
    CHECK_RC(rsb_set_weight(b, na, RSB_WEIGHT_MIN - 1), RSB_INVALID_ARGUMENT);
    CHECK(strstr(last_error(), "0") != NULL);
    CHECK(stats_of(b, na).weight == 1);
    CHECK_RC(rsb_set_weight(b, na, RSB_WEIGHT_MAX + 1), RSB_INVALID_ARGUMENT);
    CHECK(strstr(last_error(), "10001") != NULL);
    CHECK(stats_of(b, na).weight == 1);
    CHECK(rsb_generation(b) == gen);
    CHECK_RC(rsb_set_weight(b, 16, 5), RSB_INVALID_ARGUMENT);        /* past max_nodes */
    CHECK_RC(rsb_set_weight(b, 15, 5), RSB_INVALID_ARGUMENT);        /* unused slot */

    /* report / node_stats on out-of-range nodes. */
    CHECK_RC(rsb_report(b, 16, 200, 1000, 0), RSB_INVALID_ARGUMENT);
    CHECK_RC(rsb_report(b, UINT32_MAX, 200, 1000, 0), RSB_INVALID_ARGUMENT);
    struct rsb_node_stats st;
    CHECK_RC(node_stats(b, 16, &st), RSB_INVALID_ARGUMENT);
    CHECK_RC(node_stats(b, 15, &st), RSB_INVALID_ARGUMENT); /* unused slot */
    CHECK(totals_of(b, 16).requests == 0);

    /* rsb_last_error: truncation, NUL termination, full length returned. */
    CHECK_RC(rsb_pool_index(b, "missing-pool", 12, &out), RSB_INVALID_ARGUMENT);
    size_t full = rsb_last_error(NULL, 0);
    CHECK(full > 8);
    char big[512];
    CHECK(rsb_last_error(big, sizeof big) == full);
    CHECK(strlen(big) == full);
    CHECK(strstr(big, "missing-pool") != NULL);
    char small[9];
    memset(small, 'X', sizeof small);
    CHECK(rsb_last_error(small, 8) == full);
    CHECK(small[7] == '\0');
    CHECK(strlen(small) == 7);
    CHECK(memcmp(small, big, 7) == 0);
    CHECK(small[8] == 'X'); /* nothing written past cap */
    char one = 'X';
    CHECK(rsb_last_error(&one, 1) == full);
    CHECK(one == '\0');
    char zero = 'X';
    CHECK(rsb_last_error(&zero, 0) == full);
    CHECK(zero == 'X');

    rsb_balancer_free(b);
}

/* ------------------------------------------------------------ 3. weights */

#define WEIGHT_PICKS 40000

/* Share of `nb` over WEIGHT_PICKS picks of `pool`, each reported as a 200. */
static double share_of(struct rsb_balancer *b, uint32_t pool, uint32_t na, uint32_t nb) {
    unsigned count_b = 0, bad = 0;
    for (int i = 0; i < WEIGHT_PICKS; i++) {
        uint32_t n = UINT32_MAX;
        if (rsb_pick(b, pool, NULL, 0, NULL, 0, &n) != RSB_OK || (n != na && n != nb)) {
            bad++;
            continue;
        }
        if (n == nb) count_b++;
        if (rsb_report(b, n, 200, 1000, 0) != RSB_OK) bad++;
    }
    CHECK(bad == 0);
    return (double)count_b / WEIGHT_PICKS;
}

static void test_weights(void) {
    section("3. weighted_random honours weights 1:3, then 3:1 after set_weight");
    static const char cfg[] =
        "{" SHM ",\"pools\":{"
        "\"w\":{\"algorithm\":\"weighted_random\",\"slow_start_ms\":0,\"nodes\":["
        "{\"id\":\"a\",\"addr\":\"127.0.0.1:8001\",\"weight\":1},"
        "{\"id\":\"b\",\"addr\":\"127.0.0.1:8002\",\"weight\":3}]}}}";
    struct rsb_balancer *b = new_balancer(cfg);
    if (!b) return;
    uint32_t pool = pool_of(b, "w");
    uint32_t na = node_of(b, "w", "a"), nb = node_of(b, "w", "b");

    double share = share_of(b, pool, na, nb);
    printf("   b share at 1:3 = %.4f\n", share);
    CHECK(share > 0.73 && share < 0.77);
    struct rsb_node_stats sa = stats_of(b, na), sb = stats_of(b, nb);
    CHECK(sa.picks + sb.picks == WEIGHT_PICKS);
    CHECK(sa.requests + sb.requests == WEIGHT_PICKS);
    CHECK(sa.inflight == 0 && sb.inflight == 0);

    CHECK_RC(rsb_set_weight(b, na, 3), RSB_OK);
    CHECK_RC(rsb_set_weight(b, nb, 1), RSB_OK);
    share = share_of(b, pool, na, nb);
    printf("   b share at 3:1 = %.4f\n", share);
    CHECK(share > 0.23 && share < 0.27);
    sa = stats_of(b, na);
    sb = stats_of(b, nb);
    CHECK(sa.picks + sb.picks == 2 * WEIGHT_PICKS);
    CHECK(sa.weight == 3 && sb.weight == 1);

    rsb_balancer_free(b);
}

/* ---------------------------------------------------------- 4. exclusion */

static void test_exclusion(void) {
    section("4. tried exclusion: backup when primaries are tried, RSB_NO_NODE when all are");
    struct rsb_balancer *b = new_balancer(CFG_MAIN);
    if (!b) return;
    uint32_t chat = pool_of(b, "chat");
    uint32_t na = node_of(b, "chat", "a"), nb = node_of(b, "chat", "b");
    uint32_t ns = node_of(b, "chat", "spare");

    /* Without exclusion, the backup is never used. */
    unsigned backup_used = 0, bad = 0;
    for (int i = 0; i < 200; i++) {
        uint32_t n;
        if (rsb_pick(b, chat, NULL, 0, NULL, 0, &n) != RSB_OK) { bad++; continue; }
        if (n == ns) backup_used++;
        if (rsb_report(b, n, 200, 1000, 0) != RSB_OK) bad++;
    }
    CHECK(bad == 0);
    CHECK(backup_used == 0);

    /* With a tried, always b. */
    uint32_t tried_a[] = {na};
    unsigned not_b = 0;
    for (int i = 0; i < 200; i++) {
        uint32_t n;
        if (rsb_pick(b, chat, NULL, 0, tried_a, 1, &n) != RSB_OK) { bad++; continue; }
        if (n != nb) not_b++;
        if (rsb_report(b, n, 200, 1000, 0) != RSB_OK) bad++;
    }
    CHECK(bad == 0);
    CHECK(not_b == 0);

    /* Every primary tried: the backup. */
    uint32_t primaries[] = {nb, na};
    uint32_t n = UINT32_MAX;
    CHECK_RC(rsb_pick(b, chat, NULL, 0, primaries, 2, &n), RSB_OK);
    CHECK(n == ns);
    CHECK(stats_of(b, ns).inflight == 1);
    CHECK_RC(rsb_report(b, n, 200, 1000, 0), RSB_OK);
    CHECK(stats_of(b, ns).inflight == 0);
    CHECK(stats_of(b, ns).requests == 1);

    /* Every node tried: RSB_NO_NODE, nothing picked, out untouched. */
    uint32_t all[] = {ns, na, nb};
    struct totals before = totals_of(b, 16);
    n = 777;
    CHECK_RC(rsb_pick(b, chat, NULL, 0, all, 3, &n), RSB_NO_NODE);
    CHECK(n == 777);
    CHECK(strstr(last_error(), "chat") != NULL);
    struct totals after = totals_of(b, 16);
    CHECK(after.picks == before.picks);
    CHECK(after.inflight == 0);

    /* Slots of another pool in `tried` do not matter. */
    uint32_t e1 = node_of(b, "embed", "e1");
    uint32_t other[] = {e1, na, nb};
    CHECK_RC(rsb_pick(b, chat, NULL, 0, other, 3, &n), RSB_OK);
    CHECK(n == ns);
    CHECK_RC(rsb_report(b, n, 200, 1000, 0), RSB_OK);

    rsb_balancer_free(b);
}

/* ------------------------------------------------------- 5. cross-process */

#define CHILDREN 4
#define CHILD_PAIRS 20000

static const char CFG_SHARED[] =
    "{" SHM ",\"pools\":{"
    "\"p\":{\"algorithm\":\"p2c_ewma\",\"nodes\":["
    "{\"id\":\"n1\",\"addr\":\"127.0.0.1:7001\"},"
    "{\"id\":\"n2\",\"addr\":\"127.0.0.1:7002\"},"
    "{\"id\":\"n3\",\"addr\":\"127.0.0.1:7003\"}]}}}";

/* Child body: exit status 0 on success, a distinct code per failure kind. */
static void child_pairs(struct rsb_balancer *b, uint32_t worker, uint32_t pool) {
    uint32_t slot = UINT32_MAX;
    if (rsb_attach_worker(b, worker, &slot) != RSB_OK) _exit(10);
    if (slot != worker) _exit(11);
    for (int i = 0; i < CHILD_PAIRS; i++) {
        uint32_t n;
        if (rsb_pick(b, pool, NULL, 0, NULL, 0, &n) != RSB_OK) _exit(12);
        if (rsb_report(b, n, 200, 1000, 0) != RSB_OK) _exit(13);
    }
    /* The child's copy of the handle: freeing it detaches this worker and unmaps the
     * region here only (the parent keeps its own), and leaves valgrind's leak check in
     * the child clean. */
    rsb_balancer_free(b);
    _exit(0);
}

static void test_cross_process(void) {
    section("5. cross-process: 4 forked workers x 20000 pick+report");
    struct rsb_balancer *b = new_balancer(CFG_SHARED);
    if (!b) return;
    uint32_t pool = pool_of(b, "p");

    fflush(stdout);
    pid_t pids[CHILDREN];
    double t0 = now_s();
    for (uint32_t i = 0; i < CHILDREN; i++) {
        pids[i] = fork();
        CHECK(pids[i] >= 0);
        if (pids[i] == 0) child_pairs(b, i, pool);
    }
    for (int i = 0; i < CHILDREN; i++) {
        if (pids[i] <= 0) continue;
        int status = 0;
        pid_t r;
        do {
            r = waitpid(pids[i], &status, 0);
        } while (r < 0 && errno == EINTR);
        CHECK(r == pids[i]);
        CHECK(WIFEXITED(status));
        if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
            printf("   child %d exited with %d\n", i, WEXITSTATUS(status));
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    printf("   children done in %.2f s\n", now_s() - t0);

    const char *ids[] = {"n1", "n2", "n3"};
    uint64_t picks = 0, requests = 0;
    for (int k = 0; k < 3; k++) {
        struct rsb_node_stats s = stats_of(b, node_of(b, "p", ids[k]));
        printf("   %s: picks %" PRIu64 " requests %" PRIu64 " inflight %" PRIu32 "\n", ids[k],
               s.picks, s.requests, s.inflight);
        CHECK(s.inflight == 0);
        CHECK(s.picks == s.requests);
        picks += s.picks;
        requests += s.requests;
    }
    CHECK(requests == (uint64_t)CHILDREN * CHILD_PAIRS);
    CHECK(picks == (uint64_t)CHILDREN * CHILD_PAIRS);

    /* The dead children's worker slots are free again. */
    uint32_t slot = UINT32_MAX;
    CHECK_RC(rsb_attach_worker(b, 3, &slot), RSB_OK);
    CHECK(slot == 3);

    rsb_balancer_free(b);
}

/* ---------------------------------------------------------------- 6. kill -9 */

static uint64_t total_inflight(const struct rsb_balancer *b) {
    return totals_of(b, 16).inflight;
}

static void test_kill9(void) {
    section("6. a worker killed with SIGKILL leaves no in-flight count behind");
    struct rsb_balancer *b = new_balancer(CFG_SHARED);
    if (!b) return;
    uint32_t pool = pool_of(b, "p");

    int fds[2];
    CHECK(pipe(fds) == 0);
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid < 0) {
        rsb_balancer_free(b);
        return;
    }
    if (pid == 0) {
        close(fds[0]);
        uint32_t slot = UINT32_MAX;
        char byte = 'k';
        if (rsb_attach_worker(b, 5, &slot) != RSB_OK || slot != 5) byte = 'A';
        for (int i = 0; i < 100 && byte == 'k'; i++) {
            uint32_t n;
            if (rsb_pick(b, pool, NULL, 0, NULL, 0, &n) != RSB_OK) byte = 'P';
        }
        if (write(fds[1], &byte, 1) != 1) _exit(20);
        for (;;) pause(); /* until SIGKILL */
    }
    close(fds[1]);
    char byte = 0;
    ssize_t r;
    do {
        r = read(fds[0], &byte, 1);
    } while (r < 0 && errno == EINTR);
    close(fds[0]);
    CHECK(r == 1);
    CHECK(byte == 'k');

    uint64_t before = total_inflight(b);
    printf("   inflight with the child alive: %" PRIu64 "\n", before);
    CHECK(before == 100);

    /* Attaching while the child lives must not reclaim its shares. */
    CHECK_RC(rsb_attach_worker(b, 0, NULL), RSB_OK);
    CHECK(total_inflight(b) == 100);
    CHECK(kill(pid, SIGKILL) == 0);
    int status = 0;
    pid_t w;
    do {
        w = waitpid(pid, &status, 0);
    } while (w < 0 && errno == EINTR);
    CHECK(w == pid);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);

    CHECK_RC(rsb_attach_worker(b, 0, NULL), RSB_OK); /* reaps dead workers */
    uint64_t after = total_inflight(b);
    printf("   inflight after SIGKILL + attach: %" PRIu64 "\n", after);
    CHECK(after == 0);

    /* picks = tries reported + tries in flight: the killed child's tries were never
     * reported and are no longer in flight, so they count nowhere. */
    CHECK(totals_of(b, 16).picks == 0);
    CHECK(totals_of(b, 16).requests == 0);

    rsb_balancer_free(b);
}

/* ------------------------------------------------------- 7. configure */

static void test_configure(void) {
    section("7. rsb_configure: keep a, remove b, add c; bad configs change nothing");
    static const char cfg1[] =
        "{" SHM ",\"pools\":{"
        "\"r\":{\"algorithm\":\"weighted_random\",\"slow_start_ms\":0,\"nodes\":["
        "{\"id\":\"a\",\"addr\":\"127.0.0.1:8001\"},"
        "{\"id\":\"b\",\"addr\":\"127.0.0.1:8002\"}]}}}";
    static const char cfg2[] =
        "{" SHM ",\"pools\":{"
        "\"r\":{\"algorithm\":\"weighted_random\",\"slow_start_ms\":0,\"nodes\":["
        "{\"id\":\"a\",\"addr\":\"127.0.0.1:8001\",\"weight\":2},"
        "{\"id\":\"c\",\"addr\":\"127.0.0.1:8003\"}]}}}";
    static const char bad_weight[] =
        "{" SHM ",\"pools\":{"
        "\"r\":{\"algorithm\":\"weighted_random\",\"slow_start_ms\":0,\"nodes\":["
        "{\"id\":\"a\",\"addr\":\"127.0.0.1:8001\",\"weight\":0},"
        "{\"id\":\"b\",\"addr\":\"127.0.0.1:8002\"}]}}}";
    static const char bad_shm[] = /* valid on its own, but capacities differ */
        "{\"shm\":{\"max_nodes\":32,\"max_pools\":4,\"max_workers\":8,\"config_bytes\":4096},"
        "\"pools\":{\"r\":{\"nodes\":[{\"id\":\"b\",\"addr\":\"127.0.0.1:8002\"}]}}}";

    struct rsb_balancer *b = new_balancer(cfg1);
    if (!b) return;
    uint32_t pool = pool_of(b, "r");
    uint32_t na = node_of(b, "r", "a"), nb = node_of(b, "r", "b");

    unsigned bad = 0;
    for (int i = 0; i < 400; i++) {
        uint32_t n;
        if (rsb_pick(b, pool, NULL, 0, NULL, 0, &n) != RSB_OK) { bad++; continue; }
        if (rsb_report(b, n, 200, 1000, 0) != RSB_OK) bad++;
    }
    CHECK(bad == 0);
    /* One try to b still in flight across the reload. */
    uint32_t tried_a[] = {na};
    uint32_t late = UINT32_MAX;
    CHECK_RC(rsb_pick(b, pool, NULL, 0, tried_a, 1, &late), RSB_OK);
    CHECK(late == nb);

    struct rsb_node_stats a_before = stats_of(b, na);
    CHECK(a_before.requests > 0);
    uint64_t gen = rsb_generation(b);

    CHECK_RC(rsb_configure(b, cfg2, strlen(cfg2)), RSB_OK);
    CHECK(rsb_generation(b) != gen);
    CHECK(pool_of(b, "r") == pool);
    CHECK(node_of(b, "r", "a") == na);
    struct rsb_node_stats a_after = stats_of(b, na);
    CHECK(a_after.requests == a_before.requests);
    CHECK(a_after.picks == a_before.picks);
    CHECK(a_after.latency_sum_us == a_before.latency_sum_us);
    CHECK(a_after.weight == 2);

    uint32_t out = 4242;
    CHECK_RC(rsb_node_index(b, "r", 1, "b", 1, &out), RSB_INVALID_ARGUMENT);
    CHECK(out == 4242);
    struct rsb_node_stats st;
    CHECK_RC(node_stats(b, nb, &st), RSB_INVALID_ARGUMENT);
    CHECK_RC(rsb_set_weight(b, nb, 5), RSB_INVALID_ARGUMENT);

    uint32_t nc = node_of(b, "r", "c");
    CHECK(nc != na);
    CHECK(nc != nb); /* a removed node's slot is not reused at once */
    struct rsb_node_stats sc = stats_of(b, nc);
    CHECK(sc.requests == 0 && sc.picks == 0 && sc.inflight == 0);

    /* The late report on removed b is accepted (its inflight returns). */
    CHECK_RC(rsb_report(b, late, 200, 1000, 0), RSB_OK);

    unsigned got_b = 0, got_a = 0, got_c = 0;
    for (int i = 0; i < 1000; i++) {
        uint32_t n;
        if (rsb_pick(b, pool, NULL, 0, NULL, 0, &n) != RSB_OK) { bad++; continue; }
        if (n == nb) got_b++;
        if (n == na) got_a++;
        if (n == nc) got_c++;
        if (rsb_report(b, n, 200, 1000, 0) != RSB_OK) bad++;
    }
    CHECK(bad == 0);
    CHECK(got_b == 0);
    CHECK(got_a + got_c == 1000);
    CHECK(got_a > 0 && got_c > 0);
    CHECK(totals_of(b, 16).inflight == 0);

    /* Bad configs through rsb_configure: RSB_CONFIG and nothing changes. */
    gen = rsb_generation(b);
    struct rsb_node_stats a_mid = stats_of(b, na);
    CHECK_RC(rsb_configure(b, bad_weight, strlen(bad_weight)), RSB_CONFIG);
    CHECK(strstr(last_error(), "pools.r.nodes[0].weight") != NULL);
    CHECK_RC(rsb_configure(b, bad_shm, strlen(bad_shm)), RSB_CONFIG);
    CHECK(strstr(last_error(), "shm.max_nodes") != NULL);
    CHECK_RC(rsb_configure(b, "{\"pools\":", 9), RSB_CONFIG);
    CHECK(rsb_generation(b) == gen);
    CHECK(node_of(b, "r", "a") == na);
    CHECK(node_of(b, "r", "c") == nc);
    CHECK_RC(rsb_node_index(b, "r", 1, "b", 1, &out), RSB_INVALID_ARGUMENT);
    CHECK(stats_of(b, na).weight == 2);
    CHECK(stats_of(b, na).requests == a_mid.requests);
    for (int i = 0; i < 200; i++) {
        uint32_t n;
        if (rsb_pick(b, pool, NULL, 0, NULL, 0, &n) != RSB_OK) { bad++; continue; }
        if (n == nb) got_b++;
        if (rsb_report(b, n, 200, 1000, 0) != RSB_OK) bad++;
    }
    CHECK(bad == 0);
    CHECK(got_b == 0);

    rsb_balancer_free(b);
}

/* ---------------------------------------------------------------- canary */

/* "p" sends a quarter of its requests to its canary "c". */
static const char CFG_CANARY[] =
    "{" SHM ",\"pools\":{"
    "\"p\":{\"nodes\":[{\"id\":\"a\",\"addr\":\"127.0.0.1:8001\"}],"
    "\"canary\":{\"pool\":\"c\",\"share\":0.25}},"
    "\"c\":{\"nodes\":[{\"id\":\"x\",\"addr\":\"127.0.0.1:8002\"}]}"
    "}}";

static void test_canary(void) {
    section("8. rsb_canary: canary pool and share; no canary; errors write nothing");
    struct rsb_balancer *b = new_balancer(CFG_CANARY);
    uint32_t p = pool_of(b, "p"), c = pool_of(b, "c");
    uint32_t out_pool = 7, out_share = 7;
    CHECK_RC(rsb_canary(b, p, &out_pool, &out_share), RSB_OK);
    CHECK(out_pool == c);
    CHECK(out_share == 2500);
    CHECK_RC(rsb_canary(b, c, &out_pool, &out_share), RSB_OK);
    CHECK(out_pool == UINT32_MAX);
    CHECK(out_share == 0);
    out_pool = 7;
    out_share = 7;
    CHECK_RC(rsb_canary(b, 999, &out_pool, &out_share), RSB_INVALID_ARGUMENT);
    CHECK(strstr(last_error(), "unknown pool index 999") != NULL);
    CHECK(out_pool == 7 && out_share == 7);
    CHECK_RC(rsb_canary(NULL, p, &out_pool, &out_share), RSB_NULL_ARGUMENT);
    CHECK_RC(rsb_canary(b, p, NULL, &out_share), RSB_NULL_ARGUMENT);
    CHECK_RC(rsb_canary(b, p, &out_pool, NULL), RSB_NULL_ARGUMENT);
    CHECK(out_pool == 7 && out_share == 7);
    rsb_balancer_free(b);
}

/* rsb_available, rsb_admit_poll and rsb_admit_leave refuse what is not theirs: a pool
 * index that is no configured pool, a queue entry out of range. */
/* rsb_pick_retry: the pick of rsb_pick_ask, then rsb_may_retry's answer for the
 * request's tries and the picked slot, in one call. */
static void test_pick_retry(void) {
    section("pick_retry");
    struct rsb_balancer *b = new_balancer(CFG_MAIN);
    uint32_t chat = pool_of(b, "chat");
    uint32_t na = node_of(b, "chat", "a"), nb = node_of(b, "chat", "b");
    struct rsb_ask ask = {NULL, 0, 0, 0};
    uint32_t out[2] = {99, 99}, tried[2] = {0, 0}, denied = 99;
    CHECK_RC(rsb_pick_retry(b, chat, &ask, NULL, 0, 0, 0, 0, out), RSB_OK);
    CHECK(out[0] == na || out[0] == nb);
    tried[0] = out[0];
    CHECK_RC(rsb_may_retry(b, chat, tried, 1, 0, &denied), RSB_OK);
    CHECK(out[1] == denied);
    CHECK_RC(rsb_report(b, out[0], 200, 1000, 0), RSB_OK);
    /* A first try on a, then the pick (b, the other primary): a retry after it would
     * find no untried primary but the backup; whatever the verdict, the same as
     * rsb_may_retry's over [a, b]. */
    tried[0] = na;
    CHECK_RC(rsb_pick_retry(b, chat, &ask, tried, 1, 1, 0, 0, out), RSB_OK);
    CHECK(out[0] == nb);
    tried[1] = out[0];
    CHECK_RC(rsb_may_retry(b, chat, tried, 2, 0, &denied), RSB_OK);
    CHECK(out[1] == denied);
    CHECK_RC(rsb_report(b, out[0], 200, 1000, 0), RSB_OK);
    /* More tries than slots, or a NULL out: refused, nothing picked. */
    CHECK_RC(rsb_pick_retry(b, chat, &ask, tried, 1, 2, 0, 0, out), RSB_INVALID_ARGUMENT);
    CHECK_RC(rsb_pick_retry(b, chat, &ask, tried, 1, 0, 0, 0, NULL), RSB_NULL_ARGUMENT);
    CHECK(stats_of(b, na).inflight == 0 && stats_of(b, nb).inflight == 0);
    rsb_balancer_free(b);
}

static void test_bad_indexes(void) {
    section("9. rsb_available and the admission queue: unknown pool, entry out of range");
    struct rsb_balancer *b = new_balancer(CFG_MAIN);
    uint32_t chat = pool_of(b, "chat"), embed = pool_of(b, "embed");
    uint64_t wait = 7;
    CHECK_RC(rsb_available(b, chat, &wait), RSB_OK);
    CHECK(wait == 0);
    wait = 7;
    /* max_pools 4, two configured: one free slot index and one past the end. */
    uint32_t unused = 0;
    while (unused == chat || unused == embed) unused++;
    CHECK_RC(rsb_available(b, unused, &wait), RSB_INVALID_ARGUMENT);
    CHECK(strstr(last_error(), "unknown pool index") != NULL);
    CHECK_RC(rsb_available(b, 999, &wait), RSB_INVALID_ARGUMENT);
    CHECK(strstr(last_error(), "unknown pool index 999") != NULL);
    CHECK(wait == 7); /* nothing written on an error */

    uint32_t verdict = 7, left = 7;
    uint64_t value = 7;
    /* 256 queue entries per pool (the default queue_slots): 256 is out of range. */
    CHECK_RC(rsb_admit_poll(b, chat, 256, 1, &verdict, &value), RSB_INVALID_ARGUMENT);
    CHECK(strstr(last_error(), "queue entry 256 is out of range 0..256") != NULL);
    CHECK_RC(rsb_admit_poll(b, chat, UINT32_MAX, 1, &verdict, &value), RSB_INVALID_ARGUMENT);
    CHECK(verdict == 7 && value == 7);
    CHECK_RC(rsb_admit_leave(b, chat, 256, 1, &left), RSB_INVALID_ARGUMENT);
    CHECK(strstr(last_error(), "queue entry 256 is out of range") != NULL);
    CHECK_RC(rsb_admit_leave(b, chat, 256, 1, NULL), RSB_INVALID_ARGUMENT);
    CHECK(left == 7);
    /* In range with a stale ticket: answered, not an error. */
    CHECK_RC(rsb_admit_poll(b, chat, 255, 1, &verdict, &value), RSB_OK);
    CHECK_RC(rsb_admit_leave(b, chat, 255, 1, &left), RSB_OK);
    CHECK(left == 0);
    rsb_balancer_free(b);
}

/* ------------------------------------------------------------------ main */

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    test_basics();
    test_errors();
    test_weights();
    test_exclusion();
    test_cross_process();
    test_kill9();
    test_configure();
    test_canary();
    test_pick_retry();
    test_bad_indexes();
    printf("%u passed, %u failed\n", g_passed, g_failed);
    return g_failed > 0 ? 1 : 0;
}
