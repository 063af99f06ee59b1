/* A small persistent thread pool (pthreads): the calling thread and `threads - 1` workers take items 0..n-1 of a job
 * in turn from an atomic counter (dynamic scheduling, so a descheduled thread does not hold the others up).
 * Workers spin briefly after a job (the next matmul of a decode step follows within microseconds), then sleep on a
 * condition variable. No OpenMP: Apple's clang has none, and this is all the kernels need. */
#ifndef TL_POOL_H
#define TL_POOL_H
#include <stddef.h>

typedef void (*tl_task)(void *ctx, ptrdiff_t item);

/* Run task(ctx, i) for every i in [0, n_items) on up to `threads` threads (the caller included); returns when all
 * are done. Calls from several threads at once are serialised. */
void tl_parallel(tl_task task, void *ctx, ptrdiff_t n_items, int threads);

#endif
