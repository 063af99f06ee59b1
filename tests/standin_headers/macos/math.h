/* Stand-in for the macOS SDK's <math.h> (see README). */
#ifndef STANDIN_MATH_H
#define STANDIN_MATH_H
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define isnan(x) __builtin_isnan(x)
#define signbit(x) __builtin_signbit(x)
float expf(float);
float sqrtf(float);
double exp(double);
double sqrt(double);
double fabs(double);
double pow(double, double);
double cos(double);
double sin(double);
double frexp(double, int *);
double ldexp(double, int);
long lrint(double);
float fabsf(float);
float fmaxf(float, float);
float rintf(float);
float floorf(float);
double fmin(double, double);
double fmax(double, double);
double nearbyint(double);
double rint(double);
double round(double);
#endif
