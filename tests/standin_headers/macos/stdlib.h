/* Stand-in for the macOS SDK's <stdlib.h> (see README). */
#ifndef STANDIN_STDLIB_H
#define STANDIN_STDLIB_H
#include <stddef.h>
void *malloc(size_t);
void *calloc(size_t, size_t);
void free(void *);
void abort(void) __attribute__((noreturn));
int posix_memalign(void **, size_t, size_t);
#endif
