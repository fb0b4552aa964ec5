"""The patch registry: idempotent, exactly reversible, and never raising into the WebUI."""

import logging

import pytest

from lib_sd3 import LOGGER_NAME
from lib_sd3.patching import AttributeAddition, AttributeSwap, ConvertOnSet, Patch, PatchRegistry, PatchState


class Base:
    def greet(self):
        return "base"


class Target(Base):
    def hello(self):
        return "hello"


def wrap(original):
    def patched(self):
        return "patched " + original(self)

    return patched


def test_swap_is_exact_and_idempotent():
    original = Target.__dict__["hello"]
    swap = AttributeSwap(Target, "hello", wrap)
    swap.apply()
    swap.apply()
    assert Target().hello() == "patched hello"
    assert swap.original is original
    swap.undo()
    swap.undo()
    assert Target.__dict__["hello"] is original


def test_swap_of_inherited_attribute_removes_override():
    swap = AttributeSwap(Target, "greet", wrap)
    swap.apply()
    assert Target().greet() == "patched base"
    swap.undo()
    assert "greet" not in Target.__dict__
    assert Target().greet() == "base"


def test_registry_applies_once_and_undoes():
    calls = []
    registry = PatchRegistry()
    registry.add(Patch("p", "Feature", lambda: None, lambda: calls.append("apply"), lambda: calls.append("undo")))
    assert registry.apply("p") is PatchState.APPLIED
    assert registry.apply("p") is PatchState.APPLIED
    assert registry.undo("p") is PatchState.PENDING
    assert registry.undo("p") is PatchState.PENDING
    assert calls == ["apply", "undo"]


def test_missing_target_disables_feature_with_one_log_line(caplog):
    registry = PatchRegistry()
    registry.add(Patch("p", "Token counter", lambda: "sd_hijack.get_prompt_lengths missing", lambda: None, lambda: None))
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        for _ in range(3):
            assert registry.apply("p") is PatchState.UNAVAILABLE
    lines = [r for r in caplog.records if "Token counter disabled" in r.getMessage()]
    assert len(lines) == 1
    assert registry.status()["p"] == {"feature": "Token counter", "state": "unavailable",
                                      "reason": "sd_hijack.get_prompt_lengths missing", "sd3_only": False}


def test_failing_apply_and_detector_never_raise():
    registry = PatchRegistry()

    def boom():
        raise RuntimeError("target changed shape")

    registry.add(Patch("a", "A", lambda: None, boom, lambda: None))
    registry.add(Patch("b", "B", boom, lambda: None, lambda: None))
    assert registry.apply("a") is PatchState.FAILED
    assert registry.apply("b") is PatchState.UNAVAILABLE
    assert "target changed shape" in registry.get("a").reason


def test_from_swaps_rolls_back_partial_apply():
    class Owner:
        x = 1

    def swaps():
        return [AttributeSwap(Owner, "x", lambda old: _Box(old)), AttributeSwap(Owner, "missing", lambda old: old)]

    registry = PatchRegistry()
    registry.add(Patch.from_swaps("p", "F", lambda: None, swaps))
    assert registry.apply("p") is PatchState.FAILED
    assert Owner.x == 1


class _Box:
    def __init__(self, value):
        self.value = value


def test_sync_applies_sd3_only_patches_while_sd3_is_loaded():
    registry = PatchRegistry()
    swap = AttributeSwap(Target, "hello", wrap)
    registry.add(Patch("sd3", "F", lambda: None, swap.apply, swap.undo, sd3_only=True))
    original = Target.__dict__["hello"]
    registry.sync(sd3_loaded=True)
    assert Target().hello() == "patched hello"
    registry.sync(sd3_loaded=False)
    assert Target.__dict__["hello"] is original
    registry.sync(sd3_loaded=True)
    registry.undo_all()
    assert Target.__dict__["hello"] is original


def test_duplicate_names_rejected():
    registry = PatchRegistry()
    registry.add(Patch("p", "F", lambda: None, lambda: None, lambda: None))
    with pytest.raises(ValueError):
        registry.add(Patch("p", "F", lambda: None, lambda: None, lambda: None))


def test_undo_all_forgets_verdicts_so_status_starts_afresh():
    present = {"target": False}
    registry = PatchRegistry()
    registry.add(Patch("p", "F", lambda: None if present["target"] else "target missing", lambda: None, lambda: None))
    assert registry.apply("p") is PatchState.UNAVAILABLE
    registry.undo_all()
    assert registry.get("p").state is PatchState.PENDING and registry.get("p").reason == ""
    present["target"] = True
    assert registry.apply("p") is PatchState.APPLIED


def test_attribute_addition_adds_and_removes_exactly_its_own():
    class Target:
        pass

    addition = AttributeAddition(lambda: Target, "extra", property(lambda self: 42))
    addition.apply()
    assert Target().extra == 42
    addition.undo()
    assert not hasattr(Target, "extra")
    addition.apply()
    Target.extra = "someone else's"  # replaced meanwhile: not ours to remove
    addition.undo()
    assert Target.extra == "someone else's"


def test_convert_on_set_converts_as_stored_and_undo_restores_the_class_attribute():
    class Holder:
        mask = None

    swap = AttributeSwap(Holder, "mask", lambda _default: ConvertOnSet("mask", lambda obj, value: value * obj.k))
    swap.apply()
    holder = Holder()
    holder.k = 3
    holder.mask = 2
    assert holder.mask == 6
    swap.undo()
    assert Holder.__dict__["mask"] is None


def test_reapply_follows_the_same_sd3_rule_as_sync():
    registry, events = PatchRegistry(), []
    for name, sd3_only in (("global", False), ("sd3", True)):
        registry.add(Patch(name, "f", lambda: None, lambda name=name: events.append(("apply", name)),
                           lambda name=name: events.append(("undo", name)), sd3_only=sd3_only))
    registry.sync(True)
    events.clear()
    registry.reapply(["global", "sd3"], sd3_loaded=False)
    assert events == [("undo", "global"), ("apply", "global"), ("undo", "sd3")]
    assert registry.get("sd3").state is PatchState.PENDING and registry.get("global").state is PatchState.APPLIED
