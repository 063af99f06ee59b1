/* Stand-in for the macOS SDK's <signal.h>: the declarations the kernels use (see README). macOS's sigset_t is a
 * 32-bit mask; pthread_sigmask lives in <signal.h> there. */
#ifndef STANDIN_SIGNAL_H
#define STANDIN_SIGNAL_H
typedef unsigned int sigset_t;
#define SIG_BLOCK 1
#define SIG_UNBLOCK 2
#define SIG_SETMASK 3
int sigfillset(sigset_t *);
int pthread_sigmask(int, const sigset_t *, sigset_t *);
#endif
