/* A small native target for the probe layer's tests and benchmarks.
 *
 * Built by the test fixtures with the system compiler:
 *   cc -O0 -g -fcf-protection=full -pthread ctarget.c -o ctarget
 * so that every function starts with `endbr64; push %rbp` (the prologue of distribution
 * builds), except pl_plain, which has no endbr64 (nocf_check) and starts with `push %rbp`,
 * and pl_lea, written in assembly, whose `endbr64` is followed by a `lea`: an instruction
 * the kernel single-steps, so a probe after its endbr64 is still a single-stepped site.
 *
 * It reads one command per line on stdin, runs it, and answers "ok <value>" on stdout,
 * so a test can attach first and then cause an exact number of calls:
 *   work N            N calls of pl_work
 *   args6 a b c d e f one call of pl_args6 (integer arguments in registers)
 *   struct a b c      one call of pl_struct (a 24-byte struct passed by value, on the stack)
 *   recurse D         pl_recurse(D): D+1 nested activations of the same function
 *   nested N          pl_outer(N): one outer call that calls pl_inner N times
 *   threads T N [US]  T new threads, each calling pl_work N times (sleeping US
 *                     microseconds after each call when given), then joined
 *   sleep US N        N calls of pl_sleep_us(US)
 *   spin_start US     a background thread calling pl_work then sleeping US, forever
 *   burn_start US     a background thread calling pl_work then computing for US of
 *                     its own CPU time, forever (always runnable: it waits on a busy CPU)
 *   serve_start US K  a background "server" forever: one step pl_step(K), which calls
 *                     the per-operation pl_op K times, then a sleep of US (a step is an
 *                     iteration; pl_op runs K times as often: a hot per-op probe)
 *   escape D C        pl_escape(D, C): D+1 nested activations; the innermost longjmps
 *                     to the setjmp of the activation at depth C, which returns
 *                     normally, so the C activations below it never return; with C > D
 *                     the jump lands in main and no activation returns (answers D)
 *   quit T            T new threads, each sleeping 50 ms (time to be attached), then
 *                     calling pl_quit, which ends the thread with pthread_exit: the call
 *                     never returns (answers T once every thread is joined)
 *   relay N           two new threads take turns N times (each waits 50 ms first, time
 *                     to be attached): one calls pl_inner(i), then the other pl_work(i),
 *                     as an engine's step hops between worker threads
 *   time FN N         N calls of FN (work, plain, endbr) timed: answers ns per call
 *   exit              exit(0)
 */
#include <pthread.h>
#include <semaphore.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

volatile long pl_sink;

struct pl_big {
    long a;
    long b;
    long c;
};

__attribute__((noinline)) long pl_work(long x) {
    pl_sink += x;
    return x + 1;
}

__attribute__((noinline, nocf_check)) long pl_plain(long x) {
    pl_sink += x;
    return x + 1;
}

/* long pl_lea(long x): x + 1, with a single-stepped first instruction after endbr64. */
__asm__(".text\n"
        ".globl pl_lea\n"
        ".type pl_lea, @function\n"
        "pl_lea:\n"
        "    endbr64\n"
        "    lea 1(%rdi), %rax\n"
        "    ret\n"
        ".size pl_lea, .-pl_lea\n");
long pl_lea(long x);

__attribute__((noinline)) long pl_endbr(long x) {
    pl_sink += x;
    return x + 1;
}

__attribute__((noinline)) long pl_args6(long a, long b, long c, long d, long e, long f) {
    pl_sink += a;
    return a + b + c + d + e + f;
}

__attribute__((noinline)) long pl_struct(struct pl_big s) {
    pl_sink += s.a;
    return s.a + s.b + s.c;
}

__attribute__((noinline)) long pl_recurse(long depth) {
    pl_sink += depth;
    if (depth <= 0)
        return 0;
    return 1 + pl_recurse(depth - 1);
}

__attribute__((noinline)) long pl_inner(long x) {
    pl_sink += x;
    return x;
}

__attribute__((noinline)) long pl_outer(long n) {
    long total = 0;
    for (long i = 0; i < n; i++)
        total += pl_inner(i);
    return total;
}

/* Where pl_escape's innermost activation jumps to: set by main or by one activation. */
static jmp_buf *pl_escape_to;

__attribute__((noinline)) long pl_escape(long depth, long catch_at) {
    jmp_buf here;
    jmp_buf *volatile outer = pl_escape_to;
    pl_sink += depth;
    if (depth == catch_at) {
        if (setjmp(here)) {
            pl_escape_to = outer;
            return -1;  /* the activations below this one were abandoned */
        }
        pl_escape_to = &here;
    }
    if (depth <= 0)
        longjmp(*pl_escape_to, 1);
    return pl_escape(depth - 1, catch_at);
}

__attribute__((noinline)) void pl_quit(long x) {
    pl_sink += x;
    pthread_exit(NULL);
}

__attribute__((noinline)) long pl_op(long x) {
    pl_sink += x;
    return x;
}

__attribute__((noinline)) long pl_step(long ops) {
    long total = 0;
    for (long i = 0; i < ops; i++)
        total += pl_op(i);
    return total;
}

__attribute__((noinline)) void pl_sleep_us(long us) {
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

struct thread_job {
    long n;
    long pause_us;
};

static void *thread_main(void *arg) {
    struct thread_job *job = arg;
    for (long i = 0; i < job->n; i++) {
        pl_work(i);
        if (job->pause_us)
            pl_sleep_us(job->pause_us);
    }
    return NULL;
}

static void *quit_main(void *arg) {
    pl_sleep_us(50000);
    pl_quit((long)arg);
    return NULL;
}

static void *spin_main(void *arg) {
    long us = (long)arg;
    for (;;) {
        pl_work(1);
        pl_sleep_us(us);
    }
    return NULL;
}

struct serve_job {
    long us;
    long ops;
};

static void *serve_main(void *arg) {
    struct serve_job job = *(struct serve_job *)arg;
    free(arg);
    for (;;) {
        pl_step(job.ops);
        pl_sleep_us(job.us);
    }
    return NULL;
}

struct relay {
    long n;
    sem_t inner_turn, work_turn;
};

/* One side of a relay: waits for its turn, calls its function, hands the turn over. */
struct relay_side {
    struct relay *relay;
    sem_t *mine, *theirs;
    long (*call)(long);
};

static void *relay_main(void *arg) {
    struct relay_side *side = arg;
    pl_sleep_us(50000);
    for (long i = 0; i < side->relay->n; i++) {
        sem_wait(side->mine);
        side->call(i);
        sem_post(side->theirs);
    }
    return NULL;
}

static void *burn_main(void *arg) {
    long us = (long)arg;
    for (;;) {
        pl_work(1);
        struct timespec t0, t;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
        do {
            pl_sink++;
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
        } while ((t.tv_sec - t0.tv_sec) * 1000000L + (t.tv_nsec - t0.tv_nsec) / 1000 < us);
    }
    return NULL;
}

int main(void) {
    char line[256];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    while (fgets(line, sizeof line, stdin)) {
        char cmd[32] = {0}, fn[32] = {0};
        long a = 0, b = 0, c = 0, d = 0, e = 0, f = 0, result = 0;
        sscanf(line, "%31s", cmd);
        if (!strcmp(cmd, "work")) {
            sscanf(line, "%*s %ld", &a);
            for (long i = 0; i < a; i++)
                result += pl_work(i);
        } else if (!strcmp(cmd, "args6")) {
            sscanf(line, "%*s %ld %ld %ld %ld %ld %ld", &a, &b, &c, &d, &e, &f);
            result = pl_args6(a, b, c, d, e, f);
        } else if (!strcmp(cmd, "struct")) {
            struct pl_big s;
            sscanf(line, "%*s %ld %ld %ld", &s.a, &s.b, &s.c);
            result = pl_struct(s);
        } else if (!strcmp(cmd, "recurse")) {
            sscanf(line, "%*s %ld", &a);
            result = pl_recurse(a);
        } else if (!strcmp(cmd, "nested")) {
            sscanf(line, "%*s %ld", &a);
            result = pl_outer(a);
        } else if (!strcmp(cmd, "threads")) {
            sscanf(line, "%*s %ld %ld %ld", &a, &b, &c);
            pthread_t tids[256];
            struct thread_job job = {b, c};
            if (a > 256)
                a = 256;
            for (long i = 0; i < a; i++)
                pthread_create(&tids[i], NULL, thread_main, &job);
            for (long i = 0; i < a; i++)
                pthread_join(tids[i], NULL);
            result = a * b;
        } else if (!strcmp(cmd, "relay")) {
            sscanf(line, "%*s %ld", &a);
            struct relay r = {.n = a};
            pthread_t inner, work;
            sem_init(&r.inner_turn, 0, 1);
            sem_init(&r.work_turn, 0, 0);
            struct relay_side inner_side = {&r, &r.inner_turn, &r.work_turn, pl_inner};
            struct relay_side work_side = {&r, &r.work_turn, &r.inner_turn, pl_work};
            pthread_create(&inner, NULL, relay_main, &inner_side);
            pthread_create(&work, NULL, relay_main, &work_side);
            pthread_join(inner, NULL);
            pthread_join(work, NULL);
            result = a;
        } else if (!strcmp(cmd, "sleep")) {
            sscanf(line, "%*s %ld %ld", &a, &b);
            for (long i = 0; i < b; i++)
                pl_sleep_us(a);
            result = b;
        } else if (!strcmp(cmd, "spin_start")) {
            pthread_t t;
            sscanf(line, "%*s %ld", &a);
            pthread_create(&t, NULL, spin_main, (void *)a);
            pthread_detach(t);
        } else if (!strcmp(cmd, "burn_start")) {
            pthread_t t;
            sscanf(line, "%*s %ld", &a);
            pthread_create(&t, NULL, burn_main, (void *)a);
            pthread_detach(t);
        } else if (!strcmp(cmd, "serve_start")) {
            pthread_t t;
            struct serve_job *job = malloc(sizeof *job);
            sscanf(line, "%*s %ld %ld", &job->us, &job->ops);
            pthread_create(&t, NULL, serve_main, job);
            pthread_detach(t);
        } else if (!strcmp(cmd, "escape")) {
            jmp_buf top;
            sscanf(line, "%*s %ld %ld", &a, &b);
            pl_escape_to = &top;
            if (!setjmp(top))
                pl_escape(a, b);
            pl_escape_to = NULL;
            result = a;
        } else if (!strcmp(cmd, "quit")) {
            pthread_t tids[256];
            sscanf(line, "%*s %ld", &a);
            if (a > 256)
                a = 256;
            for (long i = 0; i < a; i++)
                pthread_create(&tids[i], NULL, quit_main, (void *)i);
            for (long i = 0; i < a; i++)
                pthread_join(tids[i], NULL);
            result = a;
        } else if (!strcmp(cmd, "time")) {
            sscanf(line, "%*s %31s %ld", fn, &a);
            long (*fp)(long) = !strcmp(fn, "plain") ? (long (*)(long))pl_plain
                             : !strcmp(fn, "endbr") ? pl_endbr : pl_work;
            long t0 = now_ns();
            for (long i = 0; i < a; i++)
                fp(i);
            result = a ? (now_ns() - t0) / a : 0;
        } else if (!strcmp(cmd, "exit")) {
            printf("ok 0\n");
            return 0;
        } else {
            printf("error unknown command %s\n", cmd);
            continue;
        }
        printf("ok %ld\n", result);
    }
    return 0;
}
