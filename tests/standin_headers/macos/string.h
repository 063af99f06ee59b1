/* Stand-in for the macOS SDK's <string.h> (see README). */
#ifndef STANDIN_STRING_H
#define STANDIN_STRING_H
#include <stddef.h>
void *memcpy(void *, const void *, size_t);
void *memset(void *, int, size_t);
int memcmp(const void *, const void *, size_t);
#endif
