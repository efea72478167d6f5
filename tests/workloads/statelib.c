/* The shared object tests/workloads/stateful_server.py compiles at warm-up (into $TMPDIR) and loads
 * with ctypes: a counter in its own data segment and a mixing function. No libc calls, so the
 * prebuilt copy beside this file (libstate.so, built with the command in stateful_server.py) loads
 * under any glibc or musl. */

static unsigned long long counter;

unsigned long long state_bump(void) { return ++counter; }

unsigned long long state_counter(void) { return counter; }

/* splitmix64: a value only this code computes, to show the object is the one that was loaded. */
unsigned long long state_mix(unsigned long long x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}
