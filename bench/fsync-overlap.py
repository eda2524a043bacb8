#!/usr/bin/env python3
"""How this machine's disk answers fdatasync, alone and overlapped (docs/BENCHMARKS.md, seventh pass).

    bench/fsync-overlap.py SECONDS THREADS same|sep [DIR]

Each thread appends 8,232 bytes (two WAL frames' worth) and calls fdatasync, in a loop, on one
shared file (`same`) or a file of its own (`sep`) in DIR (default: the current directory), and
prints each thread's sync latency percentiles. With two threads it also counts, for thread 0's
syncs over 2 ms, how many a later-started sync of thread 1 finished before -- the question being
whether a second, overlapping sync could answer a batch that a slow sync holds up.
"""
import os
import sys
import threading
import time


def main():
    dur, nthreads, mode = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    where = sys.argv[4] if len(sys.argv) > 4 else "."
    same = mode == "same"
    paths = [os.path.join(where, "fsync-overlap-%d.bin" % (0 if same else i)) for i in range(nthreads)]
    fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in paths]
    res = [[] for _ in range(nthreads)]
    lock, offset = threading.Lock(), [0]

    def run(i):
        buf = b"x" * 8232
        end = time.monotonic() + dur
        while time.monotonic() < end:
            with lock:
                at = offset[0]
                offset[0] += len(buf)
            os.pwrite(fds[i], buf, at)
            t = time.monotonic()
            os.fdatasync(fds[i])
            res[i].append((t, time.monotonic() - t))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(nthreads):
        v = sorted(d for _, d in res[i])
        n = len(v)
        q = lambda f: v[min(n - 1, int(n * f))] * 1e3
        print("thread %d: %d syncs, p50 %.3f p90 %.3f p99 %.3f p99.9 %.3f max %.3f ms, %d over 2 ms"
              % (i, n, q(0.5), q(0.9), q(0.99), q(0.999), v[-1] * 1e3, sum(d > 0.002 for d in v)))
    if nthreads == 2:
        slow = [(t, d) for t, d in res[0] if d > 0.002]
        rescued = sum(any(t1 > t and t1 + d1 < t + d for t1, d1 in res[1]) for t, d in slow)
        print("thread 0's syncs over 2 ms: %d; a later-started sync of thread 1 finished first: %d"
              % (len(slow), rescued))
    for p in set(paths):
        os.unlink(p)


if __name__ == "__main__":
    main()
