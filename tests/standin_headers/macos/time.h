/* Stand-in for the macOS SDK's <time.h> (see README): clock_gettime exists since macOS 10.12. */
#ifndef STANDIN_TIME_H
#define STANDIN_TIME_H
struct timespec { long tv_sec; long tv_nsec; };
typedef enum { _CLOCK_REALTIME = 0, _CLOCK_MONOTONIC = 6 } clockid_t;
#define CLOCK_REALTIME _CLOCK_REALTIME
#define CLOCK_MONOTONIC _CLOCK_MONOTONIC
int clock_gettime(clockid_t, struct timespec *);
#endif
