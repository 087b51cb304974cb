"""A process pool that survives its workers dying.

tensorflow-io decodes in C++, and a malformed file can take the whole process down (a segfault or
abort, not an exception). Each task runs in a worker process; a worker that dies costs only the
task it held, which is reported as failed, and a fresh worker takes its place.
"""
import multiprocessing as mp
from multiprocessing.connection import wait


def _serve(conn, func):
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):   # the parent is gone (killed): nothing left to do, nothing to say
            return
        if task is None:
            return
        index, args = task
        try:
            reply = (index, True, func(*args))
        except Exception as e:  # noqa: BLE001 - reported per task; the worker lives on
            reply = (index, False, str(e) or type(e).__name__)
        conn.send(reply)


class _Worker:
    def __init__(self, ctx, func):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, func), daemon=True)
        self.proc.start()
        child.close()
        self.task = None

    def give(self, task):
        self.task = task
        self.conn.send(task)

    def stop(self):
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()


def run_tasks(func, tasks, workers):
    """Run `func(*args)` for each args in `tasks` on `workers` processes.

    Yields (index, ok, result) in completion order: result is func's return value, or a one-line
    reason when it raised or its worker died. `func` must be importable (a module-level function).
    """
    ctx = mp.get_context("spawn")  # never fork a process that may hold TensorFlow's threads
    queue = iter(enumerate(tasks))
    pool = [_Worker(ctx, func) for _ in range(max(1, workers))]
    try:
        for w in pool:
            task = next(queue, None)
            if task is not None:
                w.give(task)
        while any(w.task is not None for w in pool):
            busy = [w for w in pool if w.task is not None]
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for i, w in enumerate(pool):
                if w.task is None or (w.conn not in ready and w.proc.sentinel not in ready):
                    continue
                try:
                    reply = w.conn.recv() if w.conn.poll() else None
                except (EOFError, OSError):
                    reply = None
                if reply is None:
                    if w.proc.is_alive():
                        continue
                    w.proc.join()
                    reply = (w.task[0], False, f"the decoder crashed (worker exit code {w.proc.exitcode})")
                    w.conn.close()
                    pool[i] = w = _Worker(ctx, func)
                w.task = None
                yield reply
                task = next(queue, None)
                if task is not None:
                    w.give(task)
    finally:
        for w in pool:
            w.stop()
