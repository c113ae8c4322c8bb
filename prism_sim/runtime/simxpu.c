/*
 * simxpu: the fake accelerator runtime of the LatencyPrism simulator.
 *
 * What a monitor sees of a real GPU engine is the library calls it makes and their
 * timing: launches return at once, synchronisations block until the device drains,
 * collectives make every rank wait for the slowest. This library reproduces exactly that,
 * with the real CUDA runtime and NCCL signatures (see simxpu.h), so the `cuda` and `nccl`
 * catalog profiles attach to it unchanged.
 *
 * Execution model
 *   - One device thread per process ("simxpu-device"), started by the first enqueue,
 *     executes work items in submission order (one FIFO for every stream, which keeps
 *     stream order and makes cudaStreamWaitEvent trivially satisfied). "Executing" an
 *     item is sleeping to an absolute CLOCK_MONOTONIC deadline (spinning under 50 us).
 *     Items are timed on a device clock: one starts when it was submitted or when the
 *     previous one ended, whichever is later, so a late wake-up of the device thread on
 *     a loaded host neither stretches a kernel nor shifts the next one.
 *   - Kernel: flops/(flops_per_s*speed) + bytes/(mem_bw*speed), times a jitter factor
 *     max(0.5, 1 + jitter*z) with z ~ N(0,1) from a seeded PRNG, divided by
 *     (1 - preempt). A graph is one item: the sum of its kernels, one draw each.
 *   - Memcpy: count/(pcie_bw*link), plus a real memcpy of `count` bytes when both
 *     pointers are non-NULL (done by the device thread when the item executes).
 *   - Collectives rendezvous with the other ranks through POSIX shared memory (a
 *     sequence number per rank and a futex), then take bytes_on_link/(link_bw*min link):
 *     allreduce 2(n-1)/n * count*size, allgather and reduce-scatter (n-1) * count*size
 *     (= (n-1)/n of the gathered buffer), broadcast and reduce count*size, starting
 *     when the last rank reached the collective (on the device clock). `link` is the
 *     smallest link factor of the ranks taking part (a ring runs at its slowest link).
 *     Collectives move no data.
 *   - ncclSend/ncclRecv are point-to-point rendezvous through the same segment: the k-th
 *     send of rank a to rank b matches the k-th receive of b from a. Each side's device
 *     reaches its op (posting its device time and link factor), waits until the other
 *     side reached the matching one, then takes count*size/(link_bw*min link) from the
 *     later of the two arrivals. A send therefore waits for its receiver, as NCCL's
 *     rendezvous does: ranks that send to each other must group the calls. Between
 *     ncclGroupStart and ncclGroupEnd, sends and receives are recorded and launched by
 *     ncclGroupEnd as one work item that posts every op before waiting on any (so a
 *     grouped exchange cannot deadlock); collectives are still enqueued when called.
 *     Sending to oneself works inside a group. Up to P2P_MAX_RANKS ranks; no data moves.
 *   - speed, link and preempt are read from the control block (simxpu.h) each time the
 *     device thread starts an item; without a control block they are 1, 1 and 0.
 *   - A collective whose peers do not all arrive within SIMXPU_COLLECTIVE_TIMEOUT_S
 *     (default 10 s), or whose peer left or died, fails: the communicator's error becomes
 *     ncclSystemError (timeout) or ncclRemoteError (peer gone), and the device gets the
 *     sticky error cudaErrorLaunchTimeout (702): pending work is dropped, every later
 *     call and synchronisation returns 702 (simxpu_configure clears it).
 *     simxpu_last_error_message() says what happened.
 *
 * Shared memory
 *   ncclGetUniqueId writes a name "/prism-sim-<pid>-<counter>-<random>" into the id.
 *   ncclCommInitRank (nranks > 1) creates or opens that segment and blocks until every
 *   rank joined (SIMXPU_INIT_TIMEOUT_S, default 30 s); the last rank to join unlinks the
 *   name at once (the mappings stay), so a crash after initialisation leaks nothing.
 *   ncclCommDestroy, and the library's destructor at exit, tell the peers this rank left;
 *   the last to leave unlinks the name if it still exists.
 *
 * Build: see setup.py (-O2 -fcf-protection=full -fno-omit-frame-pointer -pthread), so
 * every exported function starts with endbr64; push %rbp.
 */
#define _GNU_SOURCE
#include "simxpu.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default"), noinline))

#define SPIN_NS 50000LL
#define WAIT_SLICE_NS 10000000LL
#define DEFAULT_COLLECTIVE_TIMEOUT_S 10.0
#define DEFAULT_INIT_TIMEOUT_S 30.0
#define DEFAULT_DEVICE_COUNT 8
#define COMM_MAX_RANKS 64
#define COMM_ID_PREFIX "/prism-sim-"
#define P2P_MAX_RANKS 16 /* point-to-point is simulated for communicators this small */
#define P2P_DEPTH 8      /* ops per (pair, direction) a side may post ahead of its peer */
#define cudaErrorInvalidConfiguration 9

#define STREAM_MAGIC 0x5354524du
#define EVENT_MAGIC 0x45564e54u
#define COMM_MAGIC 0x434f4d4du
#define DEAD_MAGIC 0xdeadbeefu

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

/* ------------------------------------------------------------------ time */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void sleep_until(int64_t deadline) {
    int64_t left = deadline - now_ns();
    if (left <= 0)
        return;
    if (left < SPIN_NS) {
        while (now_ns() < deadline)
            cpu_relax();
        return;
    }
    struct timespec ts = {.tv_sec = deadline / 1000000000LL, .tv_nsec = deadline % 1000000000LL};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static double env_seconds(const char *name, double fallback) {
    const char *text = getenv(name);
    if (!text || !*text)
        return fallback;
    char *end = NULL;
    double value = strtod(text, &end);
    if (end == text || !isfinite(value) || value <= 0)
        return fallback;
    return value;
}

/* ------------------------------------------------------------------ PRNG (xoshiro256**) */

static uint64_t rng_state[4];
static int rng_have_spare;
static double rng_spare;

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void rng_seed(uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        rng_state[i] = splitmix64(&x);
    rng_have_spare = 0;
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(void) {
    uint64_t *s = rng_state;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

static double rng_uniform(void) { return (double)(rng_next() >> 11) * 0x1.0p-53; }

static double rng_normal(void) {
    if (rng_have_spare) {
        rng_have_spare = 0;
        return rng_spare;
    }
    double u1;
    do {
        u1 = rng_uniform();
    } while (u1 <= 0.0);
    double u2 = rng_uniform();
    double r = sqrt(-2.0 * log(u1));
    rng_spare = r * sin(2.0 * M_PI * u2);
    rng_have_spare = 1;
    return r * cos(2.0 * M_PI * u2);
}

/* ------------------------------------------------------------------ objects */

struct simxpu_stream {
    uint32_t magic;
    uint64_t last_seq; /* global sequence number of the last item enqueued on it */
};

struct simxpu_event {
    uint32_t magic;
    int refs;     /* the user's handle + one per pending marker */
    int recorded; /* cudaEventRecord was called */
    int stamped;  /* the marker of the latest record executed */
    uint64_t seq; /* marker of the latest record */
    int64_t time_ns;
};

/* Point-to-point rendezvous board, indexed [dir][from][to] with dir P2P_SEND (`from`
 * sends to `to`) or P2P_RECV (`from` receives from `to`). posted: ops `from` has reached
 * on its device; seen: how many of them `to` has read; slot: the device time and link
 * factor of op k at k % P2P_DEPTH. Zero-filled. */
enum { P2P_SEND = 0, P2P_RECV = 1 };

struct p2p_slot {
    int64_t ns;
    uint64_t link_bits;
};

struct p2p_board {
    uint32_t epoch; /* futex word of a private board (one-rank communicator) */
    uint32_t pad;
    uint64_t posted[2][P2P_MAX_RANKS][P2P_MAX_RANKS];
    uint64_t seen[2][P2P_MAX_RANKS][P2P_MAX_RANKS];
    struct p2p_slot slot[2][P2P_MAX_RANKS][P2P_MAX_RANKS][P2P_DEPTH];
};

/* the per-communicator shared segment (zero-filled by ftruncate) */
struct comm_shm {
    uint32_t nranks;
    uint32_t joined;
    uint32_t epoch; /* futex word: bumped on every arrival, join and departure */
    uint32_t left;
    uint32_t broken; /* a rank gave up on the communicator: everyone fails */
    uint32_t unlinked;
    int32_t pid[COMM_MAX_RANKS];
    uint32_t departed[COMM_MAX_RANKS];
    uint64_t arrive[COMM_MAX_RANKS];          /* sequence number of the latest collective */
    uint64_t link_bits[2][COMM_MAX_RANKS];    /* link factor per rank, by parity of seq */
    int64_t arrive_ns[2][COMM_MAX_RANKS];     /* device time each rank reached it */
    struct p2p_board p2p;
};

struct simxpu_comm {
    uint32_t magic;
    int rank;
    int nranks;
    pid_t owner; /* the process that initialised it (handles do not survive fork) */
    char name[NCCL_UNIQUE_ID_BYTES];
    struct comm_shm *sh; /* NULL when nranks == 1 */
    uint64_t next_cseq;  /* collectives enqueued so far */
    uint64_t last_seq;   /* global sequence number of its latest item */
    int error;           /* sticky ncclResult_t (atomic) */
    int64_t timeout_ns;
    struct simxpu_comm *next_live;
    struct p2p_board *board; /* &sh->p2p, or a private one when nranks == 1 */
    uint32_t *p2p_epoch;     /* futex word p2p waits sleep on (&sh->epoch or the board's) */
    uint64_t p2p_next[2][P2P_MAX_RANKS]; /* p2p ops enqueued so far, per direction and peer */
};

enum { W_KERNEL, W_MEMCPY, W_COLL, W_EVENT, W_P2P };

/* one ncclSend or ncclRecv */
struct p2p_op {
    struct simxpu_comm *comm;
    struct simxpu_stream *stream;
    const char *what;
    int dir; /* P2P_SEND or P2P_RECV */
    int peer;
    double bytes;
    uint64_t seq; /* k: this is the k-th op of comm in this direction with peer */
};

struct item {
    struct item *next;
    uint64_t seq;
    int64_t submit_ns; /* when the host enqueued it */
    int kind;
    const char *what;
    /* memcpy */
    void *dst;
    const void *src;
    size_t count;
    /* collective */
    struct simxpu_comm *comm;
    uint64_t cseq;
    double link_bytes;
    /* event marker */
    struct simxpu_event *event;
    /* point-to-point ops launched together */
    struct p2p_op *ops;
    int nops;
    /* kernels: n pairs (flops, bytes) */
    int n;
    double work[];
};

/* what the device thread read when it started an item */
struct plan {
    int skip;
    int64_t dur_ns;
    double link;
    double link_bw;
};

/* ------------------------------------------------------------------ global state */

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_work_cv = PTHREAD_COND_INITIALIZER;
static pthread_cond_t g_done_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t g_msg_mu = PTHREAD_MUTEX_INITIALIZER;

static struct item *g_head, *g_tail;
static uint64_t g_submitted, g_completed;
static int g_thread_started;
static int g_dev_error; /* sticky cudaError_t */
static char g_errmsg[512];
static struct simxpu_stream g_default_stream = {STREAM_MAGIC, 0};
static struct simxpu_comm *g_live_comms;
static int g_device;
static uint32_t g_id_counter;

static struct {
    double flops_per_s, mem_bw, link_bw, pcie_bw, jitter;
} g_cfg = {5e12, 5e11, 5e10, 2.5e10, 0.02};

static struct simxpu_ctl *g_ctl; /* read only under g_mu */
static int g_ctl_rank;

static int64_t g_dev_free; /* device clock: end of the latest item (device thread only) */

static __thread int tl_last_error;
static __thread int tl_group_depth;
static __thread struct p2p_op *tl_group_ops; /* p2p calls recorded since ncclGroupStart */
static __thread int tl_group_nops, tl_group_cap;

static int fail(int err) {
    if (err)
        tl_last_error = err;
    return err;
}

static void set_message(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void set_message(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    pthread_mutex_lock(&g_msg_mu);
    vsnprintf(g_errmsg, sizeof g_errmsg, fmt, ap);
    pthread_mutex_unlock(&g_msg_mu);
    va_end(ap);
}

/* ------------------------------------------------------------------ device thread */

static double clamp(double v, double lo, double hi, double fallback) {
    if (!isfinite(v))
        return fallback;
    return v < lo ? lo : (v > hi ? hi : v);
}

/* under g_mu */
static void read_control(double *speed, double *link, double *preempt) {
    *speed = 1.0;
    *link = 1.0;
    *preempt = 0.0;
    if (!g_ctl)
        return;
    volatile struct simxpu_rank_ctl *rc = &g_ctl->rank[g_ctl_rank];
    *speed = clamp(rc->speed, 1e-3, 1e3, 1.0);
    *link = clamp(rc->link, 1e-3, 1e3, 1.0);
    *preempt = clamp(rc->preempt, 0.0, 0.9, 0.0);
}

/* under g_mu: duration of an item from the cost model, the control block and the PRNG */
static void make_plan(const struct item *it, struct plan *p) {
    double speed, link, preempt;
    read_control(&speed, &link, &preempt);
    p->skip = g_dev_error != 0;
    p->dur_ns = 0;
    p->link = link;
    p->link_bw = g_cfg.link_bw;
    double seconds = 0.0;
    switch (it->kind) {
    case W_KERNEL:
        for (int i = 0; i < it->n; i++) {
            double nominal = it->work[2 * i] / (g_cfg.flops_per_s * speed) +
                             it->work[2 * i + 1] / (g_cfg.mem_bw * speed);
            double factor = 1.0 + g_cfg.jitter * rng_normal();
            if (factor < 0.5)
                factor = 0.5;
            seconds += nominal * factor / (1.0 - preempt);
        }
        break;
    case W_MEMCPY:
        seconds = (double)it->count / (g_cfg.pcie_bw * link);
        break;
    default:
        break;
    }
    p->dur_ns = (int64_t)(seconds * 1e9);
}

/* Device time at which an item submitted at `submit_ns` starts: when it was submitted or
 * when the device finished the previous item, whichever is later. Items are timed on
 * this device clock, not on when the device thread happened to get the CPU, so a late
 * wake-up of the thread (a loaded host) delays when completion is noticed but never
 * stretches a kernel or shifts the next one. */
static int64_t device_start(int64_t submit_ns) {
    return g_dev_free > submit_ns ? g_dev_free : submit_ns;
}

/* occupy the device from `start` for `dur_ns` */
static void occupy(int64_t start, int64_t dur_ns) {
    int64_t end = start + dur_ns;
    sleep_until(end);
    g_dev_free = end;
}

static void futex_wake_all(uint32_t *word) {
    __atomic_add_fetch(word, 1, __ATOMIC_ACQ_REL);
    syscall(SYS_futex, word, FUTEX_WAKE, 0x7fffffff, NULL, NULL, 0);
}

static void futex_wait_slice(uint32_t *word, uint32_t seen, int64_t max_ns) {
    if (max_ns > WAIT_SLICE_NS)
        max_ns = WAIT_SLICE_NS;
    if (max_ns <= 0)
        return;
    struct timespec ts = {.tv_sec = max_ns / 1000000000LL, .tv_nsec = max_ns % 1000000000LL};
    syscall(SYS_futex, word, FUTEX_WAIT, seen, &ts, NULL, 0);
}

static int pid_gone(pid_t pid) { return pid > 0 && kill(pid, 0) == -1 && errno == ESRCH; }

/* Wait until every rank has joined (k == 0) or arrived at collective k. Returns 0,
 * ncclRemoteError (a peer left, died or gave up) or ncclSystemError (timeout). */
static int comm_wait(struct simxpu_comm *c, uint64_t k, int64_t timeout_ns, const char *what) {
    struct comm_shm *sh = c->sh;
    int n = c->nranks;
    int64_t start = now_ns();
    int64_t deadline = start + timeout_ns;
    for (;;) {
        uint32_t seen = LOAD(&sh->epoch);
        int missing = 0;
        char missing_list[160] = "";
        size_t used = 0;
        for (int r = 0; r < n; r++) {
            int here = k == 0 ? LOAD(&sh->pid[r]) != 0 : LOAD(&sh->arrive[r]) >= k;
            if (here)
                continue;
            missing++;
            if (used < sizeof missing_list - 8)
                used += (size_t)snprintf(missing_list + used, sizeof missing_list - used, "%s%d",
                                         used ? "," : "", r);
            if (LOAD(&sh->departed[r])) {
                set_message("%s: rank %d of %d: rank %d left the communicator", what, c->rank, n,
                            r);
                return ncclRemoteError;
            }
            pid_t pid = LOAD(&sh->pid[r]);
            if (pid_gone(pid)) {
                set_message("%s: rank %d of %d: rank %d (pid %d) died", what, c->rank, n, r,
                            (int)pid);
                return ncclRemoteError;
            }
        }
        if (!missing && (k != 0 || LOAD(&sh->joined) >= (uint32_t)n))
            return 0;
        if (LOAD(&sh->broken)) {
            set_message("%s: rank %d of %d: another rank gave up on the communicator", what,
                        c->rank, n);
            return ncclRemoteError;
        }
        int64_t now = now_ns();
        if (now >= deadline) {
            set_message("%s: rank %d of %d: timed out after %.1f s waiting for rank(s) %s", what,
                        c->rank, n, (double)(now - start) / 1e9, missing_list);
            return ncclSystemError;
        }
        futex_wait_slice(&sh->epoch, seen, deadline - now);
    }
}

static int exec_collective(struct item *it, const struct plan *p) {
    struct simxpu_comm *c = it->comm;
    double link = p->link;
    int64_t start = device_start(it->submit_ns);
    if (c->nranks > 1) {
        struct comm_shm *sh = c->sh;
        uint64_t k = it->cseq;
        int slot = (int)(k & 1);
        uint64_t bits;
        memcpy(&bits, &link, sizeof bits);
        STORE(&sh->link_bits[slot][c->rank], bits);
        STORE(&sh->arrive_ns[slot][c->rank], start);
        STORE(&sh->arrive[c->rank], k);
        futex_wake_all(&sh->epoch);
        int rc = comm_wait(c, k, c->timeout_ns, it->what);
        if (rc) {
            __atomic_store_n(&c->error, rc, __ATOMIC_RELEASE);
            STORE(&sh->broken, 1u);
            futex_wake_all(&sh->epoch);
            return cudaErrorLaunchTimeout;
        }
        /* the transfer starts when the last rank reached the collective */
        for (int r = 0; r < c->nranks; r++) {
            uint64_t other_bits = LOAD(&sh->link_bits[slot][r]);
            double other;
            memcpy(&other, &other_bits, sizeof other);
            if (other > 0 && other < link)
                link = other;
            int64_t arrived = LOAD(&sh->arrive_ns[slot][r]);
            if (arrived > start)
                start = arrived;
        }
    }
    occupy(start, (int64_t)(it->link_bytes / (p->link_bw * link) * 1e9));
    return 0;
}

/* Wait until *word >= target for a p2p op (0), or fail like a collective: the peer left or
 * died (ncclRemoteError), the communicator broke, or the timeout passed (ncclSystemError). */
static int p2p_wait(const struct p2p_op *op, const uint64_t *word, uint64_t target,
                    int64_t deadline, const char *waiting_for) {
    struct simxpu_comm *c = op->comm;
    struct comm_shm *sh = c->sh;
    for (;;) {
        uint32_t seen = LOAD(c->p2p_epoch);
        if (LOAD(word) >= target)
            return 0;
        if (sh) {
            if (LOAD(&sh->departed[op->peer]) && op->peer != c->rank) {
                set_message("%s: rank %d of %d: peer %d left the communicator", op->what,
                            c->rank, c->nranks, op->peer);
                return ncclRemoteError;
            }
            pid_t pid = LOAD(&sh->pid[op->peer]);
            if (pid_gone(pid)) {
                set_message("%s: rank %d of %d: peer %d (pid %d) died", op->what, c->rank,
                            c->nranks, op->peer, (int)pid);
                return ncclRemoteError;
            }
            if (LOAD(&sh->broken)) {
                set_message("%s: rank %d of %d: another rank gave up on the communicator",
                            op->what, c->rank, c->nranks);
                return ncclRemoteError;
            }
        }
        int64_t now = now_ns();
        if (now >= deadline) {
            set_message("%s: rank %d of %d: timed out waiting for peer %d to %s", op->what,
                        c->rank, c->nranks, op->peer, waiting_for);
            return ncclSystemError;
        }
        futex_wait_slice(c->p2p_epoch, seen, deadline - now);
    }
}

static int p2p_failed(const struct p2p_op *op, int rc) {
    struct simxpu_comm *c = op->comm;
    __atomic_store_n(&c->error, rc, __ATOMIC_RELEASE);
    if (c->sh)
        STORE(&c->sh->broken, 1u);
    futex_wake_all(c->p2p_epoch);
    return cudaErrorLaunchTimeout;
}

/* Every op of the item reaches the device at once (posted), then each waits for its
 * match; the item ends when the last transfer does. */
static int exec_p2p(struct item *it, const struct plan *p) {
    int64_t start = device_start(it->submit_ns);
    for (int i = 0; i < it->nops; i++) {
        const struct p2p_op *op = &it->ops[i];
        struct simxpu_comm *c = op->comm;
        struct p2p_board *b = c->board;
        uint64_t k = op->seq;
        /* the peer must have read op k - P2P_DEPTH before its slot is reused */
        if (k > P2P_DEPTH) {
            int64_t deadline = now_ns() + c->timeout_ns;
            int rc = p2p_wait(op, &b->seen[op->dir][c->rank][op->peer], k - P2P_DEPTH,
                              deadline, "catch up");
            if (rc)
                return p2p_failed(op, rc);
        }
        struct p2p_slot *slot = &b->slot[op->dir][c->rank][op->peer][k % P2P_DEPTH];
        uint64_t bits;
        memcpy(&bits, &p->link, sizeof bits);
        STORE(&slot->ns, start);
        STORE(&slot->link_bits, bits);
        STORE(&b->posted[op->dir][c->rank][op->peer], k);
        futex_wake_all(c->p2p_epoch);
    }
    int64_t end = start;
    for (int i = 0; i < it->nops; i++) {
        const struct p2p_op *op = &it->ops[i];
        struct simxpu_comm *c = op->comm;
        struct p2p_board *b = c->board;
        int other = 1 - op->dir;
        uint64_t k = op->seq;
        int64_t deadline = now_ns() + c->timeout_ns;
        int rc = p2p_wait(op, &b->posted[other][op->peer][c->rank], k, deadline,
                          op->dir == P2P_SEND ? "receive" : "send");
        if (rc)
            return p2p_failed(op, rc);
        struct p2p_slot *slot = &b->slot[other][op->peer][c->rank][k % P2P_DEPTH];
        int64_t arrived = LOAD(&slot->ns);
        uint64_t other_bits = LOAD(&slot->link_bits);
        STORE(&b->seen[other][op->peer][c->rank], k);
        futex_wake_all(c->p2p_epoch);
        double link = p->link, peer_link;
        memcpy(&peer_link, &other_bits, sizeof peer_link);
        if (peer_link > 0 && peer_link < link)
            link = peer_link;
        int64_t from = arrived > start ? arrived : start; /* the later of the two */
        int64_t done = from + (int64_t)(op->bytes / (p->link_bw * link) * 1e9);
        if (done > end)
            end = done;
    }
    occupy(start, end - start);
    return 0;
}

static void release_event_locked(struct simxpu_event *ev) {
    if (--ev->refs == 0) {
        ev->magic = DEAD_MAGIC;
        free(ev);
    }
}

static void free_item(struct item *it) {
    free(it->ops);
    free(it);
}

static void *device_main(void *arg) {
    (void)arg;
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    pthread_setname_np(pthread_self(), "simxpu-device");
    for (;;) {
        pthread_mutex_lock(&g_mu);
        while (!g_head)
            pthread_cond_wait(&g_work_cv, &g_mu);
        struct item *it = g_head;
        g_head = it->next;
        if (!g_head)
            g_tail = NULL;
        struct plan p;
        make_plan(it, &p);
        pthread_mutex_unlock(&g_mu);

        int err = 0;
        int64_t stamp = 0;
        if (!p.skip) {
            switch (it->kind) {
            case W_KERNEL:
                occupy(device_start(it->submit_ns), p.dur_ns);
                break;
            case W_MEMCPY:
                if (it->dst && it->src && it->count)
                    memmove(it->dst, it->src, it->count);
                occupy(device_start(it->submit_ns), p.dur_ns);
                break;
            case W_COLL:
                err = exec_collective(it, &p);
                break;
            case W_P2P:
                err = exec_p2p(it, &p);
                break;
            case W_EVENT:
                break;
            }
        }
        if (it->kind == W_EVENT)
            stamp = device_start(it->submit_ns);

        pthread_mutex_lock(&g_mu);
        if (err && !g_dev_error)
            g_dev_error = err;
        if (it->kind == W_EVENT) {
            struct simxpu_event *ev = it->event;
            if (ev->seq == it->seq) {
                ev->time_ns = stamp;
                ev->stamped = 1;
            }
            release_event_locked(ev);
        }
        g_completed = it->seq;
        pthread_cond_broadcast(&g_done_cv);
        pthread_mutex_unlock(&g_mu);
        free_item(it);
    }
    return NULL;
}

/* under g_mu */
static int ensure_device_thread_locked(void) {
    if (g_thread_started)
        return 0;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* signals go to the application's threads */
    pthread_t thread;
    int rc = pthread_create(&thread, &attr, device_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        set_message("cannot start the device thread: %s", strerror(rc));
        return cudaErrorUnknown;
    }
    g_thread_started = 1;
    return 0;
}

static struct item *new_item(int kind, const char *what, int n) {
    struct item *it = calloc(1, sizeof *it + (size_t)(n > 0 ? n : 0) * 2 * sizeof(double));
    if (it) {
        it->kind = kind;
        it->what = what;
        it->n = n;
    }
    return it;
}

static int resolve_stream(cudaStream_t stream, struct simxpu_stream **out) {
    /* NULL, cudaStreamLegacy (0x1) and cudaStreamPerThread (0x2) are the default stream */
    if ((uintptr_t)stream <= 2) {
        *out = &g_default_stream;
        return 0;
    }
    if (stream->magic != STREAM_MAGIC)
        return cudaErrorInvalidResourceHandle;
    *out = stream;
    return 0;
}

/* Append an item to the device FIFO; frees it on error. */
static int enqueue(struct item *it, struct simxpu_stream *s, uint64_t *seq_out) {
    pthread_mutex_lock(&g_mu);
    int err = g_dev_error ? g_dev_error : ensure_device_thread_locked();
    if (err) {
        pthread_mutex_unlock(&g_mu);
        free_item(it);
        return err;
    }
    it->seq = ++g_submitted;
    it->submit_ns = now_ns();
    s->last_seq = it->seq;
    if (it->comm) {
        it->cseq = ++it->comm->next_cseq;
        it->comm->last_seq = it->seq;
    }
    for (int i = 0; i < it->nops; i++) { /* p2p: numbered per direction and peer */
        struct p2p_op *op = &it->ops[i];
        op->seq = ++op->comm->p2p_next[op->dir][op->peer];
        op->comm->last_seq = it->seq;
        op->stream->last_seq = it->seq;
    }
    if (it->event) {
        it->event->refs++;
        it->event->recorded = 1;
        it->event->stamped = 0;
        it->event->seq = it->seq;
    }
    if (g_tail)
        g_tail->next = it;
    else
        g_head = it;
    g_tail = it;
    pthread_cond_signal(&g_work_cv);
    pthread_mutex_unlock(&g_mu);
    if (seq_out)
        *seq_out = it->seq;
    return 0;
}

/* Block until item `seq` completed; returns the sticky device error, if any. */
static int wait_seq(uint64_t seq) {
    pthread_mutex_lock(&g_mu);
    while (g_completed < seq && !g_dev_error)
        pthread_cond_wait(&g_done_cv, &g_mu);
    int err = g_dev_error;
    pthread_mutex_unlock(&g_mu);
    return err;
}

static int valid_amount(double v) { return isfinite(v) && v >= 0.0; }

/* ------------------------------------------------------------------ simulator knobs */

EXPORT int simxpu_abi_version(void) { return SIMXPU_ABI_VERSION; }

EXPORT cudaError_t simxpu_configure(double flops_per_s, double mem_bw, double link_bw,
                                    double pcie_bw, double jitter, unsigned long long seed) {
    if (!(isfinite(flops_per_s) && flops_per_s > 0 && isfinite(mem_bw) && mem_bw > 0 &&
          isfinite(link_bw) && link_bw > 0 && isfinite(pcie_bw) && pcie_bw > 0 &&
          valid_amount(jitter))) {
        set_message("simxpu_configure: rates must be finite and > 0, jitter finite and >= 0");
        return fail(cudaErrorInvalidValue);
    }
    pthread_mutex_lock(&g_mu);
    while (g_completed < g_submitted) /* a fresh device: drain what is pending */
        pthread_cond_wait(&g_done_cv, &g_mu);
    g_cfg.flops_per_s = flops_per_s;
    g_cfg.mem_bw = mem_bw;
    g_cfg.link_bw = link_bw;
    g_cfg.pcie_bw = pcie_bw;
    g_cfg.jitter = jitter;
    rng_seed(seed);
    g_dev_error = 0;
    pthread_mutex_unlock(&g_mu);
    set_message("%s", "");
    return cudaSuccess;
}

EXPORT cudaError_t simxpu_attach_control(const char *shm_name, int rank) {
    struct simxpu_ctl *old;
    if (!shm_name || !*shm_name) {
        pthread_mutex_lock(&g_mu);
        old = g_ctl;
        g_ctl = NULL;
        pthread_mutex_unlock(&g_mu);
        if (old)
            munmap(old, sizeof *old);
        return cudaSuccess;
    }
    char path[256];
    if (snprintf(path, sizeof path, "%s%s", shm_name[0] == '/' ? "" : "/", shm_name) >=
        (int)sizeof path) {
        set_message("simxpu_attach_control: name too long");
        return fail(cudaErrorInvalidValue);
    }
    int fd = shm_open(path, O_RDWR, 0);
    if (fd < 0) {
        set_message("simxpu_attach_control: %s: %s", path, strerror(errno));
        return fail(cudaErrorInvalidValue);
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || (size_t)st.st_size < sizeof(struct simxpu_ctl)) {
        close(fd);
        set_message("simxpu_attach_control: %s: smaller than a control block", path);
        return fail(cudaErrorInvalidValue);
    }
    struct simxpu_ctl *ctl = mmap(NULL, sizeof *ctl, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (ctl == MAP_FAILED) {
        set_message("simxpu_attach_control: mmap %s: %s", path, strerror(errno));
        return fail(cudaErrorInvalidValue);
    }
    uint32_t nranks = LOAD(&ctl->nranks);
    if (LOAD(&ctl->magic) != SIMXPU_CTL_MAGIC || rank < 0 || rank >= SIMXPU_CTL_MAX_RANKS ||
        (uint32_t)rank >= nranks) {
        munmap(ctl, sizeof *ctl);
        set_message("simxpu_attach_control: %s: not a control block, or rank %d not in it", path,
                    rank);
        return fail(cudaErrorInvalidValue);
    }
    pthread_mutex_lock(&g_mu);
    old = g_ctl;
    g_ctl = ctl;
    g_ctl_rank = rank;
    pthread_mutex_unlock(&g_mu);
    if (old)
        munmap(old, sizeof *old);
    return cudaSuccess;
}

EXPORT size_t simxpu_last_error_message(char *buf, size_t size) {
    pthread_mutex_lock(&g_msg_mu);
    size_t len = strlen(g_errmsg);
    if (buf && size) {
        size_t n = len < size - 1 ? len : size - 1;
        memcpy(buf, g_errmsg, n);
        buf[n] = 0;
    }
    pthread_mutex_unlock(&g_msg_mu);
    return len;
}

/* ------------------------------------------------------------------ CUDA: device */

EXPORT cudaError_t cudaGetDeviceCount(int *count) {
    if (!count)
        return fail(cudaErrorInvalidValue);
    const char *text = getenv("SIMXPU_DEVICE_COUNT");
    int n = text && *text ? atoi(text) : DEFAULT_DEVICE_COUNT;
    *count = n > 0 ? n : DEFAULT_DEVICE_COUNT;
    return cudaSuccess;
}

EXPORT cudaError_t cudaSetDevice(int device) {
    const char *text = getenv("SIMXPU_DEVICE_COUNT");
    int n = text && *text ? atoi(text) : DEFAULT_DEVICE_COUNT;
    if (n <= 0)
        n = DEFAULT_DEVICE_COUNT;
    if (device < 0 || device >= n)
        return fail(cudaErrorInvalidDevice);
    __atomic_store_n(&g_device, device, __ATOMIC_RELAXED);
    return cudaSuccess;
}

EXPORT cudaError_t cudaGetDevice(int *device) {
    if (!device)
        return fail(cudaErrorInvalidValue);
    *device = __atomic_load_n(&g_device, __ATOMIC_RELAXED);
    return cudaSuccess;
}

EXPORT cudaError_t cudaGetLastError(void) {
    int err = tl_last_error;
    tl_last_error = 0;
    pthread_mutex_lock(&g_mu);
    if (!err)
        err = g_dev_error;
    pthread_mutex_unlock(&g_mu);
    return err;
}

EXPORT cudaError_t cudaPeekAtLastError(void) {
    int err = tl_last_error;
    pthread_mutex_lock(&g_mu);
    if (!err)
        err = g_dev_error;
    pthread_mutex_unlock(&g_mu);
    return err;
}

EXPORT const char *cudaGetErrorString(cudaError_t error) {
    switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorLaunchTimeout: return "the launch timed out and was terminated";
    default: return "unrecognized error code";
    }
}

EXPORT cudaError_t cudaDeviceSynchronize(void) {
    pthread_mutex_lock(&g_mu);
    uint64_t seq = g_submitted;
    pthread_mutex_unlock(&g_mu);
    return fail(wait_seq(seq));
}

/* ------------------------------------------------------------------ CUDA: streams */

EXPORT cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags) {
    (void)flags;
    if (!stream)
        return fail(cudaErrorInvalidValue);
    struct simxpu_stream *s = calloc(1, sizeof *s);
    if (!s)
        return fail(cudaErrorMemoryAllocation);
    s->magic = STREAM_MAGIC;
    *stream = s;
    return cudaSuccess;
}

EXPORT cudaError_t cudaStreamCreate(cudaStream_t *stream) {
    return cudaStreamCreateWithFlags(stream, 0);
}

EXPORT cudaError_t cudaStreamDestroy(cudaStream_t stream) {
    /* work items never point at their stream, so pending work simply finishes */
    if ((uintptr_t)stream <= 2 || stream->magic != STREAM_MAGIC)
        return fail(cudaErrorInvalidResourceHandle);
    pthread_mutex_lock(&g_mu);
    stream->magic = DEAD_MAGIC;
    pthread_mutex_unlock(&g_mu);
    free(stream);
    return cudaSuccess;
}

EXPORT cudaError_t cudaStreamQuery(cudaStream_t stream) {
    struct simxpu_stream *s;
    int err = resolve_stream(stream, &s);
    if (err)
        return fail(err);
    pthread_mutex_lock(&g_mu);
    err = g_dev_error ? g_dev_error : (g_completed >= s->last_seq ? 0 : cudaErrorNotReady);
    pthread_mutex_unlock(&g_mu);
    return err;
}

EXPORT cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    struct simxpu_stream *s;
    int err = resolve_stream(stream, &s);
    if (err)
        return fail(err);
    pthread_mutex_lock(&g_mu);
    uint64_t seq = s->last_seq;
    pthread_mutex_unlock(&g_mu);
    return fail(wait_seq(seq));
}

/* ------------------------------------------------------------------ CUDA: launches */

static int launch_one(const struct simxpu_kernel *k, dim3 grid, dim3 block, cudaStream_t stream,
                      const char *what) {
    if (!k)
        return cudaErrorInvalidDeviceFunction;
    if (!grid.x || !grid.y || !grid.z || !block.x || !block.y || !block.z)
        return cudaErrorInvalidConfiguration;
    if (!valid_amount(k->flops) || !valid_amount(k->bytes)) {
        set_message("%s: kernel descriptor with a negative or non-finite cost", what);
        return cudaErrorInvalidValue;
    }
    struct simxpu_stream *s;
    int err = resolve_stream(stream, &s);
    if (err)
        return err;
    struct item *it = new_item(W_KERNEL, what, 1);
    if (!it)
        return cudaErrorMemoryAllocation;
    it->work[0] = k->flops;
    it->work[1] = k->bytes;
    return enqueue(it, s, NULL);
}

EXPORT cudaError_t cudaLaunchKernel(const void *func, dim3 gridDim, dim3 blockDim, void **args,
                                    size_t sharedMem, cudaStream_t stream) {
    (void)args;
    (void)sharedMem;
    return fail(launch_one(func, gridDim, blockDim, stream, "cudaLaunchKernel"));
}

EXPORT cudaError_t cudaLaunchKernelExC(const cudaLaunchConfig_t *config, const void *func,
                                       void **args) {
    (void)args;
    if (!config)
        return fail(cudaErrorInvalidValue);
    return fail(launch_one(func, config->gridDim, config->blockDim, config->stream,
                           "cudaLaunchKernelExC"));
}

EXPORT cudaError_t cudaGraphLaunch(cudaGraphExec_t graphExec, cudaStream_t stream) {
    const struct simxpu_graph *g = graphExec;
    if (!g)
        return fail(cudaErrorInvalidResourceHandle);
    if (g->n < 0 || (g->n > 0 && !g->kernels))
        return fail(cudaErrorInvalidValue);
    for (int i = 0; i < g->n; i++) {
        const struct simxpu_kernel *k = g->kernels[i];
        if (!k || !valid_amount(k->flops) || !valid_amount(k->bytes)) {
            set_message("cudaGraphLaunch: kernel %d of the graph is missing or has a bad cost", i);
            return fail(cudaErrorInvalidValue);
        }
    }
    struct simxpu_stream *s;
    int err = resolve_stream(stream, &s);
    if (err)
        return fail(err);
    struct item *it = new_item(W_KERNEL, "cudaGraphLaunch", g->n);
    if (!it)
        return fail(cudaErrorMemoryAllocation);
    for (int i = 0; i < g->n; i++) {
        it->work[2 * i] = g->kernels[i]->flops;
        it->work[2 * i + 1] = g->kernels[i]->bytes;
    }
    return fail(enqueue(it, s, NULL));
}

/* ------------------------------------------------------------------ CUDA: memcpy */

static int memcpy_enqueue(void *dst, const void *src, size_t count, int kind,
                          struct simxpu_stream *s, const char *what, uint64_t *seq) {
    if (kind < 0 || kind > 4)
        return cudaErrorInvalidMemcpyDirection;
    struct item *it = new_item(W_MEMCPY, what, 0);
    if (!it)
        return cudaErrorMemoryAllocation;
    it->dst = dst;
    it->src = src;
    it->count = count;
    return enqueue(it, s, seq);
}

EXPORT cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, int kind,
                                   cudaStream_t stream) {
    struct simxpu_stream *s;
    int err = resolve_stream(stream, &s);
    if (err)
        return fail(err);
    return fail(memcpy_enqueue(dst, src, count, kind, s, "cudaMemcpyAsync", NULL));
}

EXPORT cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, int kind) {
    uint64_t seq = 0;
    int err = memcpy_enqueue(dst, src, count, kind, &g_default_stream, "cudaMemcpy", &seq);
    if (err)
        return fail(err);
    return fail(wait_seq(seq));
}

/* ------------------------------------------------------------------ CUDA: events */

static int event_ok(cudaEvent_t event) { return event && event->magic == EVENT_MAGIC; }

EXPORT cudaError_t cudaEventCreate(cudaEvent_t *event) {
    if (!event)
        return fail(cudaErrorInvalidValue);
    struct simxpu_event *ev = calloc(1, sizeof *ev);
    if (!ev)
        return fail(cudaErrorMemoryAllocation);
    ev->magic = EVENT_MAGIC;
    ev->refs = 1;
    *event = ev;
    return cudaSuccess;
}

EXPORT cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags) {
    (void)flags;
    if (!event)
        return fail(cudaErrorInvalidValue);
    struct simxpu_event *ev = calloc(1, sizeof *ev);
    if (!ev)
        return fail(cudaErrorMemoryAllocation);
    ev->magic = EVENT_MAGIC;
    ev->refs = 1;
    *event = ev;
    return cudaSuccess;
}

EXPORT cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
    if (!event_ok(event))
        return fail(cudaErrorInvalidResourceHandle);
    struct simxpu_stream *s;
    int err = resolve_stream(stream, &s);
    if (err)
        return fail(err);
    struct item *it = new_item(W_EVENT, "cudaEventRecord", 0);
    if (!it)
        return fail(cudaErrorMemoryAllocation);
    it->event = event;
    return fail(enqueue(it, s, NULL));
}

EXPORT cudaError_t cudaEventQuery(cudaEvent_t event) {
    if (!event_ok(event))
        return fail(cudaErrorInvalidResourceHandle);
    pthread_mutex_lock(&g_mu);
    int err = g_dev_error;
    if (!err && event->recorded && g_completed < event->seq)
        err = cudaErrorNotReady;
    pthread_mutex_unlock(&g_mu);
    return err;
}

EXPORT cudaError_t cudaEventSynchronize(cudaEvent_t event) {
    if (!event_ok(event))
        return fail(cudaErrorInvalidResourceHandle);
    pthread_mutex_lock(&g_mu);
    uint64_t seq = event->recorded ? event->seq : 0;
    pthread_mutex_unlock(&g_mu);
    return fail(wait_seq(seq));
}

EXPORT cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
    if (!ms)
        return fail(cudaErrorInvalidValue);
    if (!event_ok(start) || !event_ok(end))
        return fail(cudaErrorInvalidResourceHandle);
    pthread_mutex_lock(&g_mu);
    int err = 0;
    if (!start->recorded || !end->recorded)
        err = cudaErrorInvalidResourceHandle;
    else if (!start->stamped || !end->stamped)
        err = g_dev_error ? g_dev_error : cudaErrorNotReady;
    else
        *ms = (float)((double)(end->time_ns - start->time_ns) / 1e6);
    pthread_mutex_unlock(&g_mu);
    return fail(err);
}

EXPORT cudaError_t cudaEventDestroy(cudaEvent_t event) {
    pthread_mutex_lock(&g_mu);
    if (!event_ok(event)) {
        pthread_mutex_unlock(&g_mu);
        return fail(cudaErrorInvalidResourceHandle);
    }
    event->magic = DEAD_MAGIC; /* freed once its pending markers executed */
    release_event_locked(event);
    pthread_mutex_unlock(&g_mu);
    return cudaSuccess;
}

EXPORT cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
    (void)flags;
    struct simxpu_stream *s;
    int err = resolve_stream(stream, &s);
    if (err)
        return fail(err);
    if (!event_ok(event))
        return fail(cudaErrorInvalidResourceHandle);
    /* one FIFO executes every stream: work enqueued later already runs after the event */
    return cudaSuccess;
}

/* ------------------------------------------------------------------ NCCL */

static int dtype_size(int datatype) {
    static const int sizes[] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2, 1, 1};
    if (datatype < 0 || datatype >= (int)(sizeof sizes / sizeof sizes[0]))
        return -1;
    return sizes[datatype];
}

EXPORT const char *ncclGetErrorString(ncclResult_t result) {
    switch (result) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error (timeout waiting for a peer)";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    default: return "unknown result code";
    }
}

EXPORT ncclResult_t ncclGetUniqueId(ncclUniqueId *uniqueId) {
    if (!uniqueId)
        return ncclInvalidArgument;
    memset(uniqueId, 0, sizeof *uniqueId);
    uint64_t x = (uint64_t)now_ns() ^ ((uint64_t)getpid() << 32) ^ (uintptr_t)uniqueId;
    unsigned counter = __atomic_add_fetch(&g_id_counter, 1, __ATOMIC_RELAXED);
    snprintf(uniqueId->internal, sizeof uniqueId->internal, COMM_ID_PREFIX "%d-%u-%08x",
             (int)getpid(), counter, (unsigned)(splitmix64(&x) & 0xffffffffu));
    return ncclSuccess;
}

static void comm_unlink(struct simxpu_comm *c) {
    if (c->sh && !__atomic_exchange_n(&c->sh->unlinked, 1u, __ATOMIC_ACQ_REL))
        shm_unlink(c->name);
}

EXPORT ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank) {
    if (!comm || nranks < 1 || nranks > COMM_MAX_RANKS || rank < 0 || rank >= nranks) {
        set_message("ncclCommInitRank: need 1 <= nranks <= %d and 0 <= rank < nranks (got %d, %d)",
                    COMM_MAX_RANKS, nranks, rank);
        return ncclInvalidArgument;
    }
    if (!memchr(commId.internal, 0, sizeof commId.internal) ||
        strncmp(commId.internal, COMM_ID_PREFIX, strlen(COMM_ID_PREFIX)) != 0) {
        set_message("ncclCommInitRank: the unique id was not made by ncclGetUniqueId");
        return ncclInvalidArgument;
    }
    struct simxpu_comm *c = calloc(1, sizeof *c);
    if (!c)
        return ncclSystemError;
    c->magic = COMM_MAGIC;
    c->rank = rank;
    c->nranks = nranks;
    c->owner = getpid();
    memcpy(c->name, commId.internal, sizeof c->name);
    c->timeout_ns =
        (int64_t)(env_seconds("SIMXPU_COLLECTIVE_TIMEOUT_S", DEFAULT_COLLECTIVE_TIMEOUT_S) * 1e9);

    if (nranks > 1) {
        int fd = shm_open(c->name, O_RDWR | O_CREAT, 0600);
        if (fd < 0) {
            set_message("ncclCommInitRank: shm_open %s: %s", c->name, strerror(errno));
            free(c);
            return ncclSystemError;
        }
        struct stat st;
        if (fstat(fd, &st) != 0 ||
            ((size_t)st.st_size < sizeof(struct comm_shm) &&
             ftruncate(fd, sizeof(struct comm_shm)) != 0)) {
            set_message("ncclCommInitRank: sizing %s: %s", c->name, strerror(errno));
            close(fd);
            free(c);
            return ncclSystemError;
        }
        c->sh = mmap(NULL, sizeof(struct comm_shm), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        if (c->sh == MAP_FAILED) {
            set_message("ncclCommInitRank: mmap %s: %s", c->name, strerror(errno));
            free(c);
            return ncclSystemError;
        }
        struct comm_shm *sh = c->sh;
        uint32_t expected = 0;
        if (!__atomic_compare_exchange_n(&sh->nranks, &expected, (uint32_t)nranks, 0,
                                         __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE) &&
            expected != (uint32_t)nranks) {
            set_message("ncclCommInitRank: rank %d says nranks=%d, another rank said %u", rank,
                        nranks, expected);
            munmap(sh, sizeof *sh);
            free(c);
            return ncclInvalidArgument;
        }
        int32_t none = 0;
        if (!__atomic_compare_exchange_n(&sh->pid[rank], &none, (int32_t)getpid(), 0,
                                         __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            set_message("ncclCommInitRank: rank %d already joined (pid %d)", rank, (int)none);
            munmap(sh, sizeof *sh);
            free(c);
            return ncclInvalidUsage;
        }
        if (__atomic_add_fetch(&sh->joined, 1u, __ATOMIC_ACQ_REL) == (uint32_t)nranks)
            comm_unlink(c); /* everyone mapped it: nothing can leak from now on */
        futex_wake_all(&sh->epoch);
        int64_t timeout =
            (int64_t)(env_seconds("SIMXPU_INIT_TIMEOUT_S", DEFAULT_INIT_TIMEOUT_S) * 1e9);
        int rc = comm_wait(c, 0, timeout, "ncclCommInitRank");
        if (rc) {
            STORE(&sh->departed[rank], 1u);
            STORE(&sh->broken, 1u);
            futex_wake_all(&sh->epoch);
            comm_unlink(c);
            munmap(sh, sizeof *sh);
            free(c);
            return rc;
        }
    }
    if (c->sh) {
        c->board = &c->sh->p2p;
        c->p2p_epoch = &c->sh->epoch;
    } else {
        c->board = calloc(1, sizeof *c->board);
        if (!c->board) {
            free(c);
            return ncclSystemError;
        }
        c->p2p_epoch = &c->board->epoch;
    }
    pthread_mutex_lock(&g_mu);
    c->next_live = g_live_comms;
    g_live_comms = c;
    pthread_mutex_unlock(&g_mu);
    *comm = c;
    return ncclSuccess;
}

static int comm_check(ncclComm_t comm) {
    if (!comm || comm->magic != COMM_MAGIC)
        return ncclInvalidArgument;
    if (comm->owner != getpid())
        return ncclInvalidUsage; /* inherited through fork */
    return ncclSuccess;
}

EXPORT ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    int rc = comm_check(comm);
    if (rc)
        return rc;
    pthread_mutex_lock(&g_mu);
    while (g_completed < comm->last_seq) /* its pending collectives end or fail first */
        pthread_cond_wait(&g_done_cv, &g_mu);
    for (struct simxpu_comm **p = &g_live_comms; *p; p = &(*p)->next_live) {
        if (*p == comm) {
            *p = comm->next_live;
            break;
        }
    }
    comm->magic = DEAD_MAGIC;
    pthread_mutex_unlock(&g_mu);
    struct comm_shm *sh = comm->sh;
    if (sh) {
        STORE(&sh->departed[comm->rank], 1u);
        futex_wake_all(&sh->epoch);
        if (__atomic_add_fetch(&sh->left, 1u, __ATOMIC_ACQ_REL) == (uint32_t)comm->nranks)
            comm_unlink(comm);
        munmap(sh, sizeof *sh);
    } else {
        free(comm->board);
    }
    free(comm);
    return ncclSuccess;
}

EXPORT ncclResult_t ncclCommCount(const ncclComm_t comm, int *count) {
    int rc = comm_check(comm);
    if (rc)
        return rc;
    if (!count)
        return ncclInvalidArgument;
    *count = comm->nranks;
    return ncclSuccess;
}

EXPORT ncclResult_t ncclCommUserRank(const ncclComm_t comm, int *rank) {
    int rc = comm_check(comm);
    if (rc)
        return rc;
    if (!rank)
        return ncclInvalidArgument;
    *rank = comm->rank;
    return ncclSuccess;
}

EXPORT ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *asyncError) {
    int rc = comm_check(comm);
    if (rc)
        return rc;
    if (!asyncError)
        return ncclInvalidArgument;
    *asyncError = __atomic_load_n(&comm->error, __ATOMIC_ACQUIRE);
    return ncclSuccess;
}

enum { C_ALLREDUCE, C_GATHER_SCATTER, C_ONE_TO_ALL };

/* The checks every NCCL call makes before it enqueues: a live communicator, a known
 * datatype (its size in *size), no asynchronous error on the communicator, and a stream
 * of this process (in *s). */
static ncclResult_t nccl_call_args(const char *what, ncclComm_t comm, ncclDataType_t datatype,
                                   cudaStream_t stream, int *size, struct simxpu_stream **s) {
    int rc = comm_check(comm);
    if (rc)
        return rc;
    *size = dtype_size(datatype);
    if (*size < 0) {
        set_message("%s: unknown datatype %d", what, datatype);
        return ncclInvalidArgument;
    }
    rc = __atomic_load_n(&comm->error, __ATOMIC_ACQUIRE);
    if (rc)
        return rc;
    if (resolve_stream(stream, s))
        return ncclInvalidArgument;
    return ncclSuccess;
}

/* Enqueue a communication item on stream s; a failure is kept for cudaGetLastError. */
static ncclResult_t nccl_enqueue(struct item *it, struct simxpu_stream *s) {
    int err = enqueue(it, s, NULL);
    if (err) {
        tl_last_error = err;
        return ncclUnhandledCudaError;
    }
    return ncclSuccess;
}

static ncclResult_t collective(const char *what, int shape, size_t count, ncclDataType_t datatype,
                               ncclComm_t comm, cudaStream_t stream) {
    int size;
    struct simxpu_stream *s;
    ncclResult_t rc = nccl_call_args(what, comm, datatype, stream, &size, &s);
    if (rc)
        return rc;
    double n = comm->nranks;
    double bytes = (double)count * size;
    double on_link = 0.0;
    if (comm->nranks > 1) {
        switch (shape) {
        case C_ALLREDUCE: on_link = 2.0 * (n - 1.0) / n * bytes; break;
        case C_GATHER_SCATTER: on_link = (n - 1.0) * bytes; break;
        default: on_link = bytes; break;
        }
    }
    struct item *it = new_item(W_COLL, what, 0);
    if (!it)
        return ncclSystemError;
    it->comm = comm;
    it->link_bytes = on_link;
    return nccl_enqueue(it, s);
}

EXPORT ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count,
                                  ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                                  cudaStream_t stream) {
    (void)sendbuff;
    (void)recvbuff;
    if (op < 0 || op > 4)
        return ncclInvalidArgument;
    return collective("ncclAllReduce", C_ALLREDUCE, count, datatype, comm, stream);
}

EXPORT ncclResult_t ncclAllGather(const void *sendbuff, void *recvbuff, size_t sendcount,
                                  ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream) {
    (void)sendbuff;
    (void)recvbuff;
    return collective("ncclAllGather", C_GATHER_SCATTER, sendcount, datatype, comm, stream);
}

EXPORT ncclResult_t ncclReduceScatter(const void *sendbuff, void *recvbuff, size_t recvcount,
                                      ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                                      cudaStream_t stream) {
    (void)sendbuff;
    (void)recvbuff;
    if (op < 0 || op > 4)
        return ncclInvalidArgument;
    return collective("ncclReduceScatter", C_GATHER_SCATTER, recvcount, datatype, comm, stream);
}

EXPORT ncclResult_t ncclBroadcast(const void *sendbuff, void *recvbuff, size_t count,
                                  ncclDataType_t datatype, int root, ncclComm_t comm,
                                  cudaStream_t stream) {
    (void)sendbuff;
    (void)recvbuff;
    if (comm_check(comm) == ncclSuccess && (root < 0 || root >= comm->nranks))
        return ncclInvalidArgument;
    return collective("ncclBroadcast", C_ONE_TO_ALL, count, datatype, comm, stream);
}

EXPORT ncclResult_t ncclReduce(const void *sendbuff, void *recvbuff, size_t count,
                               ncclDataType_t datatype, ncclRedOp_t op, int root, ncclComm_t comm,
                               cudaStream_t stream) {
    (void)sendbuff;
    (void)recvbuff;
    if (op < 0 || op > 4)
        return ncclInvalidArgument;
    if (comm_check(comm) == ncclSuccess && (root < 0 || root >= comm->nranks))
        return ncclInvalidArgument;
    return collective("ncclReduce", C_ONE_TO_ALL, count, datatype, comm, stream);
}

/* Enqueue `n` p2p ops as one work item (copied). */
static ncclResult_t launch_p2p(const struct p2p_op *ops, int n, const char *what) {
    struct item *it = new_item(W_P2P, what, 0);
    struct p2p_op *copy = malloc((size_t)n * sizeof *copy);
    if (!it || !copy) {
        free(it);
        free(copy);
        return ncclSystemError;
    }
    memcpy(copy, ops, (size_t)n * sizeof *copy);
    it->ops = copy;
    it->nops = n;
    return nccl_enqueue(it, ops[0].stream);
}

static ncclResult_t p2p(const char *what, int dir, size_t count, ncclDataType_t datatype,
                        int peer, ncclComm_t comm, cudaStream_t stream) {
    int size;
    struct simxpu_stream *s;
    ncclResult_t rc = nccl_call_args(what, comm, datatype, stream, &size, &s);
    if (rc)
        return rc;
    if (peer < 0 || peer >= comm->nranks) {
        set_message("%s: peer %d is not a rank of the communicator (0..%d)", what, peer,
                    comm->nranks - 1);
        return ncclInvalidArgument;
    }
    if (comm->nranks > P2P_MAX_RANKS) {
        set_message("%s: point-to-point is simulated for up to %d ranks, not %d", what,
                    P2P_MAX_RANKS, comm->nranks);
        return ncclInvalidUsage;
    }
    struct p2p_op op = {.comm = comm, .stream = s, .what = what, .dir = dir, .peer = peer,
                        .bytes = (double)count * size};
    if (tl_group_depth == 0)
        return launch_p2p(&op, 1, what);
    if (tl_group_nops == tl_group_cap) {
        int cap = tl_group_cap ? 2 * tl_group_cap : 8;
        struct p2p_op *grown = realloc(tl_group_ops, (size_t)cap * sizeof *grown);
        if (!grown)
            return ncclSystemError;
        tl_group_ops = grown;
        tl_group_cap = cap;
    }
    tl_group_ops[tl_group_nops++] = op;
    return ncclSuccess;
}

EXPORT ncclResult_t ncclSend(const void *sendbuff, size_t count, ncclDataType_t datatype,
                             int peer, ncclComm_t comm, cudaStream_t stream) {
    (void)sendbuff;
    return p2p("ncclSend", P2P_SEND, count, datatype, peer, comm, stream);
}

EXPORT ncclResult_t ncclRecv(void *recvbuff, size_t count, ncclDataType_t datatype, int peer,
                             ncclComm_t comm, cudaStream_t stream) {
    (void)recvbuff;
    return p2p("ncclRecv", P2P_RECV, count, datatype, peer, comm, stream);
}

/* Collectives are enqueued as they are called (their order is kept); sends and receives
 * are recorded and launched together by the outermost ncclGroupEnd. */
EXPORT ncclResult_t ncclGroupStart(void) {
    tl_group_depth++;
    return ncclSuccess;
}

EXPORT ncclResult_t ncclGroupEnd(void) {
    if (tl_group_depth <= 0) {
        set_message("ncclGroupEnd without ncclGroupStart");
        return ncclInvalidUsage;
    }
    if (--tl_group_depth > 0 || tl_group_nops == 0)
        return ncclSuccess;
    int n = tl_group_nops;
    tl_group_nops = 0;
    for (int i = 0; i < n; i++) { /* a communicator destroyed or failed since the call */
        int rc = comm_check(tl_group_ops[i].comm);
        if (!rc)
            rc = __atomic_load_n(&tl_group_ops[i].comm->error, __ATOMIC_ACQUIRE);
        if (rc)
            return rc;
    }
    return launch_p2p(tl_group_ops, n, "ncclGroupEnd");
}

/* ------------------------------------------------------------------ process life */

/* A forked child has no device thread and does not own its parent's communicators. */
static void atfork_child(void) {
    pthread_mutex_init(&g_mu, NULL);
    pthread_mutex_init(&g_msg_mu, NULL);
    pthread_cond_init(&g_work_cv, NULL);
    pthread_cond_init(&g_done_cv, NULL);
    g_head = g_tail = NULL;
    g_thread_started = 0;
    g_completed = g_submitted;
    g_live_comms = NULL;
    tl_group_nops = 0; /* recorded p2p calls belong to the parent's communicators */
    tl_group_depth = 0;
}

__attribute__((constructor)) static void simxpu_init(void) {
    rng_seed(0);
    pthread_atfork(NULL, NULL, atfork_child);
}

/* At exit, tell the peers of every live communicator that this rank left (so they fail
 * at once instead of timing out) and remove a name that is still linked (initialisation
 * never completed). Mappings go with the process. */
__attribute__((destructor)) static void simxpu_fini(void) {
    int locked = pthread_mutex_trylock(&g_mu) == 0;
    for (struct simxpu_comm *c = g_live_comms; c; c = c->next_live) {
        if (c->owner != getpid() || !c->sh)
            continue;
        STORE(&c->sh->departed[c->rank], 1u);
        futex_wake_all(&c->sh->epoch);
        comm_unlink(c);
    }
    if (locked)
        pthread_mutex_unlock(&g_mu);
}
