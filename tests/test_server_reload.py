"""Supervisor.reload: an unchanged image is not republished, and the supervisor keeps no
copy of an image it published (at 10k services and 100k endpoints a copy is 30 MiB
of the pod's 170 MiB; the workers' shared mapping is the one copy that must exist).

No sockets or workers: a fake source hands ``reload`` image bytes, a real Publisher seals
them into memfds with no worker attached.
"""
from __future__ import annotations

import gc
import inspect

from kdns.serve import supervisor as server
from tests.zonefixtures import sample_image


class FakeSource:
    path = "fake"
    push = False        # polled like a file: unchanged images are recognised and skipped

    def __init__(self):
        self.next = None
        self.generations = []

    def poll(self, force: bool = False):
        data, self.next = self.next, None
        return data

    def published(self, generation: int) -> None:
        self.generations.append(generation)


def supervisor() -> tuple[server.Supervisor, FakeSource]:
    source = FakeSource()
    return server.Supervisor(server.ServeConfig(), source), source


def test_an_image_is_published_once_however_often_it_is_read():
    sup, source = supervisor()
    try:
        for data, force, expect in [(sample_image(), False, [1]),
                                    (sample_image(), False, [1]),          # same bytes: skip
                                    (sample_image("10.96.0.2"), False, [1, 2]),
                                    (sample_image("10.96.0.2"), True, [1, 2]),  # SIGHUP
                                    (sample_image(), True, [1, 2, 3]),      # SIGHUP, new
                                    (None, False, [1, 2, 3])]:             # nothing new
            source.next = data
            sup.reload(force=force)
            assert source.generations == expect
    finally:
        sup.publisher.close()


def test_supervisor_keeps_no_reference_to_a_published_image():
    sup, source = supervisor()
    try:
        data = source.next = sample_image()
        sup.reload()
        assert source.generations == [1]
        # Only this test's frame may hold it (the supervisor, its publisher or any container
        # of theirs would show up here as the object or its __dict__).
        assert [r for r in gc.get_referrers(data) if not inspect.isframe(r)] == []
    finally:
        sup.publisher.close()


def test_a_push_source_is_published_without_hashing_the_image(monkeypatch):
    """The API controller's images never repeat (the SOA serial moves with every change):
    hashing 30 MiB per publish would only add to the programming latency."""
    from kdns.serve import supervisor as S

    def no_hash(data):
        raise AssertionError("a push source's image was hashed")

    sup, source = supervisor()
    source.push = True
    monkeypatch.setattr(S, "image_digest", no_hash)
    try:
        for data, expect in [(sample_image(), [1]), (sample_image("10.96.0.2"), [1, 2])]:
            source.next = data
            sup.reload()
            assert source.generations == expect
    finally:
        sup.publisher.close()
