"""CUDA-graph captures run with Python's cyclic collector paused (vision/graphed.py `collector_paused`): a dead
engine's graphs destroyed by the collector in the middle of a capture would make an illegal CUDA call there and
fail the capture (seen on an H200 when a test built a second engine while the first one's cycle was still alive)."""
import gc
import weakref

from vision.graphed import collector_paused


class _Cycle:
    def __init__(self):
        self.me = self


def test_dead_cycles_are_collected_first_and_the_collector_waits_until_the_end():
    assert gc.isenabled()
    dead = _Cycle()
    ref = weakref.ref(dead)
    del dead
    with collector_paused():
        assert ref() is None  # collected before the capture starts, not during it
        assert not gc.isenabled()
        with collector_paused():  # nested (a batch of captures, each in its own): the outermost decides
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_the_collector_comes_back_after_a_failed_capture():
    try:
        with collector_paused():
            raise RuntimeError("capture failed")
    except RuntimeError:
        pass
    assert gc.isenabled()


def test_a_collector_already_off_is_left_off():
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
