"""Router session registry: fencing by epoch, including sessions that arrive late."""

from __future__ import annotations

from pgroute.proxy.router import Backend, Route, Router


class FakeSession:
    def __init__(self, epoch: int, backend_name: str = "primary") -> None:
        self.epoch = epoch
        self.backend_name = backend_name
        self.closed: str | None = None

    def close(self, reason: str) -> None:
        self.closed = reason


def test_close_sessions_ends_older_epochs_only():
    router = Router(Route(Backend("primary", "h", 1), 2))
    old, current = FakeSession(1), FakeSession(2)
    router._sessions.update({old, current})  # registered before the switch to epoch 2
    assert router.close_sessions(before_epoch=2, reason="fence") == 1
    assert old.closed == "fence" and current.closed is None


def test_a_session_registering_after_the_epoch_moved_on_is_closed():
    """It was connecting while a switch fenced its epoch: close_sessions could not see
    it, so register must not let it in."""
    router = Router(Route(Backend("primary", "h", 1), 1))
    late = FakeSession(1)
    router.publish(Route(Backend("mirror", "h", 2), 2))
    assert router.register(late) is False
    assert late.closed and "epoch changed to 2" in late.closed
    assert router.session_count == 0

    on_time = FakeSession(2)
    assert router.register(on_time) is True and on_time.closed is None
    assert router.session_count == 1
    # A pause or resume keeps the epoch: a session of that epoch still registers.
    router.pause("maintenance")
    assert router.register(FakeSession(2)) is True
