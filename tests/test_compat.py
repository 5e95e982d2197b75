"""models/compat.py: the release shims pick the name the installed release has, old or new."""

from types import SimpleNamespace

from alignkit.models.compat import checkpointing_enabled, enable_activation_checkpointing


class New:
    is_activation_checkpointing = property(lambda self: self._on)

    def __init__(self, on):
        self._on, self.calls, self.config = on, [], SimpleNamespace(use_cache=True)

    def activation_checkpointing_enable(self, **kwargs):
        self.calls.append(("activation", kwargs))


class Old:
    def __init__(self, on):
        self.is_gradient_checkpointing, self.calls = on, []
        self.config = SimpleNamespace(use_cache=True)

    def gradient_checkpointing_enable(self, **kwargs):
        self.calls.append(("gradient", kwargs))


def test_checkpointing_enabled_reads_either_release_name():
    assert checkpointing_enabled(New(True)) and not checkpointing_enabled(New(False))
    assert checkpointing_enabled(Old(True)) and not checkpointing_enabled(Old(False))
    assert not checkpointing_enabled(object())


def test_enable_activation_checkpointing_calls_the_release_method_non_reentrant():
    for model, name, key in (
        (New(False), "activation", "activation_checkpointing_kwargs"),
        (Old(False), "gradient", "gradient_checkpointing_kwargs"),
    ):
        enable_activation_checkpointing(model)
        assert model.calls == [(name, {key: {"use_reentrant": False}})]
        assert model.config.use_cache is False
