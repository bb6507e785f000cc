"""Reading DICOM headers in threads (the SR writer's pool) leaves pydicom's validation and Python's
warnings as it found them: the switches medray.io.dicom.private() throws are process-wide."""

from __future__ import annotations

import threading
import warnings

from pydicom import config

from medray.io.dicom import private


def test_overlapping_private_blocks_in_two_threads_restore_validation_and_warnings():
    validation, filters = (config.settings.reading_validation_mode, config.settings.writing_validation_mode), list(warnings.filters)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen_inside = []

    def first():  # enters first, leaves first
        with private():
            a_in.set()
            b_in.wait()
        a_out.set()

    def second():  # enters while the first is inside, leaves after it
        a_in.wait()
        with private():
            b_in.set()
            a_out.wait()
            seen_inside.append(config.settings.reading_validation_mode)  # after the first left

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert seen_inside == [config.IGNORE]  # still private while the second thread is inside
    assert (config.settings.reading_validation_mode, config.settings.writing_validation_mode) == validation
    assert warnings.filters == filters
