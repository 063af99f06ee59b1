/* Stand-in for the macOS SDK's <stdio.h> (see README). */
#ifndef STANDIN_STDIO_H
#define STANDIN_STDIO_H
int printf(const char *, ...) __attribute__((format(printf, 1, 2)));
#endif
