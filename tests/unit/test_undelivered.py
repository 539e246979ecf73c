"""The marks that keep a failure made while a delivery was on its way (undelivered.py)."""

from __future__ import annotations

from sa_redis_cache.undelivered import Undelivered


def test_a_delivery_forgets_what_it_was_sent_for() -> None:
    undelivered = Undelivered()
    undelivered.keep({"products", "categories"})
    marks = undelivered.marks()
    assert set(marks) == {"products", "categories"}
    assert undelivered.forget_delivered(marks) is True
    assert not undelivered
    assert undelivered.names == set()


def test_a_failure_kept_while_the_delivery_was_on_its_way_survives_it() -> None:
    """The write behind the second failure may have committed after the send ran: the
    send retired nothing it wrote."""
    undelivered = Undelivered()
    undelivered.keep({"products"})
    marks = undelivered.marks()
    undelivered.keep({"products"})  # failed again while the first send was on its way
    assert undelivered.forget_delivered(marks) is False
    assert "products" in undelivered
    assert undelivered.forget_delivered(undelivered.marks()) is True


def test_a_delivery_of_some_names_leaves_the_others() -> None:
    undelivered = Undelivered()
    undelivered.keep({"a", "b"})
    assert undelivered.forget_delivered(undelivered.marks(["a"])) is False
    assert undelivered.names == {"b"}
    assert len(undelivered) == 1


def test_a_name_kept_after_the_marks_were_taken_is_not_forgotten() -> None:
    undelivered = Undelivered()
    undelivered.keep({"a"})
    marks = undelivered.marks()
    undelivered.keep({"b"})  # not in the send at all
    assert undelivered.forget_delivered(marks) is False
    assert undelivered.names == {"b"}


def test_marks_of_a_delivered_name_are_zero_and_forget_nothing_kept_later() -> None:
    undelivered = Undelivered()
    marks = undelivered.marks(["a"])
    assert marks == {"a": 0}
    undelivered.keep({"a"})
    assert undelivered.forget_delivered(marks) is False
    assert "a" in undelivered
