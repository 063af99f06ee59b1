/* The thread pool of pool.h. */
#include "pool.h"

#include <pthread.h>
#ifndef _WIN32
#include <signal.h>
#endif
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#define MAX_THREADS 256
#define SPIN_NS 200000 /* how long an idle worker polls for the next job before it sleeps (0.2 ms) */

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

static struct {
    pthread_mutex_t call_lock; /* one job at a time */
    pthread_mutex_t lock;      /* with `wake`: sleeping workers */
    pthread_cond_t wake;
    int started;               /* workers running */
    atomic_long generation;    /* bumped for every job */
    atomic_int sleeping;
    atomic_long next;          /* next item to take */
    atomic_int slots;          /* workers the current job still wants (a worker takes one per job it sees) */
    atomic_int busy;           /* slots taken and not finished yet, plus slots not taken yet */
    tl_task task;
    void *ctx;
    ptrdiff_t n_items;
} pool = {.call_lock = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static int64_t now_ns(void) /* 64 bits where `long` has 32 (Windows) */
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void take_items(void)
{
    ptrdiff_t i;
    while ((i = atomic_fetch_add(&pool.next, 1)) < pool.n_items) pool.task(pool.ctx, i);
}

static void *worker(void *arg)
{
    long seen = (long)(ptrdiff_t)arg; /* the generation before the job it was started for */
    for (;;) {
        int64_t t0 = now_ns();
        int spins = 0;
        while (atomic_load(&pool.generation) == seen) {
            CPU_RELAX();
            if (++spins % 256 == 0 && now_ns() - t0 > SPIN_NS) {
                pthread_mutex_lock(&pool.lock);
                atomic_fetch_add(&pool.sleeping, 1);
                while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
                atomic_fetch_sub(&pool.sleeping, 1);
                pthread_mutex_unlock(&pool.lock);
            }
        }
        seen = atomic_load(&pool.generation);
        /* A slot ties this worker's items to the job that is current now (a worker that wakes late may take part in
         * a newer job than the one it woke for: that is fine, each slot is finished exactly once). */
        if (atomic_fetch_sub(&pool.slots, 1) > 0) {
            take_items();
            atomic_fetch_sub(&pool.busy, 1);
        }
    }
    return NULL;
}

/* Start workers until `wanted` run (on first need; they live as long as the process). They start with every signal
 * blocked: a process-directed signal (Ctrl-C's SIGINT) must reach the main thread, where Python runs its handlers;
 * landing on a worker it would leave the main thread asleep in its select() (readline at `tinyllama chat`'s prompt)
 * until the next key. */
static void start_workers(int wanted)
{
#ifndef _WIN32
    sigset_t all, before;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &before);
#endif
    while (pool.started < wanted) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, (void *)(ptrdiff_t)atomic_load(&pool.generation)) != 0) break;
        pthread_detach(t);
        pool.started++;
    }
#ifndef _WIN32
    pthread_sigmask(SIG_SETMASK, &before, NULL);
#endif
}

void tl_parallel(tl_task task, void *ctx, ptrdiff_t n_items, int threads)
{
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n_items) threads = (int)n_items;
    if (threads <= 1) {
        for (ptrdiff_t i = 0; i < n_items; i++) task(ctx, i);
        return;
    }
    pthread_mutex_lock(&pool.call_lock);
    if (pool.started < threads - 1) start_workers(threads - 1);
    if (threads > pool.started + 1) threads = pool.started + 1;
    pool.task = task;
    pool.ctx = ctx;
    pool.n_items = n_items;
    atomic_store(&pool.next, 0);
    atomic_store(&pool.busy, threads - 1); /* before `slots`: a late worker may claim a slot as soon as it is set */
    atomic_store(&pool.slots, threads - 1);
    atomic_fetch_add(&pool.generation, 1);
    if (atomic_load(&pool.sleeping) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    take_items();
    /* Slots no worker has claimed yet (a worker descheduled by a busy machine) are withdrawn: the items are done,
     * so wait only for workers that are still running one. */
    int unclaimed = atomic_exchange(&pool.slots, 0);
    if (unclaimed > 0) atomic_fetch_sub(&pool.busy, unclaimed);
    while (atomic_load(&pool.busy) > 0) CPU_RELAX();
    pthread_mutex_unlock(&pool.call_lock);
}
