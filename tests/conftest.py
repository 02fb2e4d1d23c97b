import contextlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the project's top-level modules


@pytest.fixture
def crash_after_checkpoint(monkeypatch):
    """`with crash_after_checkpoint(): stage()` runs the stage until it has written its first checkpoint.pth, then
    stops it as a crash would (KeyboardInterrupt, which the block expects); after the block saving is normal again."""
    import engine
    save = engine.atomic_save

    def crash(obj, path):
        save(obj, path)
        if path.name == 'checkpoint.pth':
            raise KeyboardInterrupt('simulated crash')

    @contextlib.contextmanager
    def crashing():
        monkeypatch.setattr(engine, 'atomic_save', crash)
        with pytest.raises(KeyboardInterrupt):
            yield
        monkeypatch.setattr(engine, 'atomic_save', save)
    return crashing
