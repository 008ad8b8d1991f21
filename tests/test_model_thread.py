"""server.engine.ModelThread: every job on one thread, in order; errors reach the caller."""

from __future__ import annotations

import threading

import pytest

from server.engine import ModelThread


def test_jobs_run_in_order_on_the_one_thread_and_errors_reach_the_caller():
    mt = ModelThread(name="model-test")
    seen = []
    first = mt.submit(lambda: seen.append(threading.current_thread().name) or 1)
    boom = mt.submit(lambda: 1 / 0)
    last = mt.submit(lambda: seen.append(threading.current_thread().name) or 3)
    assert first.result(5) == 1 and last.result(5) == 3
    with pytest.raises(ZeroDivisionError):
        boom.result(5)
    assert seen == ["model-test", "model-test"]
    mt.close()
    mt.thread.join(5)
    assert not mt.thread.is_alive()
