"""Autosave of the fine-tune training list, so corrections survive a crash (headless: no napari or Qt).

The SGDC Fine-tune widget saves every pair it adds to its training list, and the pairs
of a run when the run starts, into a cache folder. If napari is closed, or the process
dies, before those corrections were trained into a kept fine-tune (or removed by the
user), the next session finds them and offers to recover them bit for bit.

Layout of the folder (``$NAPARI_SGDC_CACHE/corrections``, by default the user cache
folder of `platformdirs`, e.g. ``~/.cache/napari-sgdc/corrections`` on Linux)::

    index.json                       # {"version": 1, "pairs": [entry, ...]}
    pair-<content hash>.npz          # images_<i>, labels_<i>[, predictions_<i>][, types_<i>,
                                     #   predicted_types_<i>: type tables] per plane

Every file is written atomically (`napari_sgdc.files.atomic_write`): a pair file
first, under a name made from its content, then the index that points to it; files
no longer in the index are removed last. A crash at any moment leaves the previous
index and every file it names intact. The index is read-modified-written under a lock
file, so two napari processes sharing the folder do not drop each other's pairs; each
entry names the session that wrote it, so a session offers only the pairs that
earlier (or other) sessions left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from napari_sgdc.files import atomic_write
from napari_sgdc.training_pairs import TrainingPair

__all__ = ["ENV_VAR", "SESSION_ID", "Autosave", "SavedPair", "cache_dir"]

ENV_VAR = "NAPARI_SGDC_CACHE"
"""Environment variable that overrides the cache folder (the tests point it at a temporary folder)."""
SESSION_ID = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
"""This process's session: the entries it writes carry it."""
INDEX = "index.json"
VERSION = 1


def cache_dir() -> Path:
    """The napari-sgdc cache folder: ``$NAPARI_SGDC_CACHE``, else the platform's user cache folder."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-sgdc"))


@dataclass(frozen=True)
class SavedPair:
    """One autosaved pair (an entry of the index).

    Attributes:
        file: the pair's ``.npz`` file name in the autosave folder.
        image_name, labels_name, model_source: as in `TrainingPair`.
        planes: number of planes.
        saved: when it was saved (local time, ISO 8601).
        session: the `SESSION_ID` of the process that saved it.
        mpp: as `TrainingPair.mpp` (absent in indexes written before it: None).
    """

    file: str
    image_name: str
    labels_name: str
    model_source: str
    planes: int
    saved: str
    session: str
    mpp: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        """(image name, model source), as `TrainingPair.key`."""
        return self.image_name, self.model_source


def _arrays(pair: TrainingPair) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for index, (image, labels) in enumerate(zip(pair.images, pair.labels)):
        arrays[f"images_{index}"] = np.asarray(image)
        arrays[f"labels_{index}"] = np.asarray(labels)
        if pair.predictions is not None:
            arrays[f"predictions_{index}"] = np.asarray(pair.predictions[index])
        for name in ("types", "predicted_types"):
            tables = getattr(pair, name)
            if tables is not None:
                arrays[f"{name}_{index}"] = np.asarray(tables[index])
    return arrays


def _digest(pair: TrainingPair, arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256(json.dumps([pair.image_name, pair.labels_name, pair.model_source]).encode())
    for name, array in arrays.items():
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()[:24]


class Autosave:
    """The autosaved training pairs in one folder.

    Args:
        folder: the autosave folder; default ``cache_dir() / "corrections"``.
        session: the session that owns what this object saves (default `SESSION_ID`).
    """

    def __init__(self, folder: str | Path | None = None, session: str | None = None) -> None:
        self.folder = Path(folder) if folder is not None else cache_dir() / "corrections"
        self.session = session if session is not None else SESSION_ID

    # -- reading ---------------------------------------------------------------------
    def entries(self) -> list[SavedPair]:
        """Every autosaved pair; an index that is missing or unreadable counts as empty."""
        try:
            data = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
            return [SavedPair(**entry) for entry in data["pairs"]]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def pending(self) -> list[SavedPair]:
        """The pairs saved by other sessions (earlier ones that closed or crashed): those to offer."""
        return [entry for entry in self.entries() if entry.session != self.session]

    def load(self, entries: Sequence[SavedPair] | None = None) -> tuple[list[TrainingPair], list[str]]:
        """Reads pairs back exactly as they were saved (dtypes and values).

        Args:
            entries: which ones (default: `pending`).

        Returns:
            The pairs, and one line per entry that could not be read (e.g. a file deleted by hand).
        """
        pairs, problems = [], []
        for entry in self.pending() if entries is None else entries:
            try:
                with np.load(self.folder / entry.file, allow_pickle=False) as data:
                    images = [np.array(data[f"images_{i}"]) for i in range(entry.planes)]
                    labels = [np.array(data[f"labels_{i}"]) for i in range(entry.planes)]
                    predictions = ([np.array(data[f"predictions_{i}"]) for i in range(entry.planes)]
                                   if "predictions_0" in data.files else None)
                    types, predicted_types = ([np.array(data[f"{name}_{i}"]) for i in range(entry.planes)]
                                              if f"{name}_0" in data.files else None  # older autosaves: none
                                              for name in ("types", "predicted_types"))
            except (OSError, ValueError, KeyError) as error:
                problems.append(f"{entry.image_name} ({entry.file}): {error}")
                continue
            pairs.append(TrainingPair(entry.image_name, entry.labels_name, images, labels, entry.model_source,
                                      predictions, entry.mpp, types, predicted_types))
        return pairs, problems

    # -- writing -----------------------------------------------------------------------
    def save(self, pairs: Iterable[TrainingPair]) -> list[SavedPair]:
        """Saves `pairs` for this session, replacing saved pairs with the same `key`.

        Returns:
            The entries written.
        """
        pairs = list(pairs)
        if not pairs:
            return []
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():  # under the lock: another process's clean-up must not see our new files as stale
            written = list({pair.key: self._write_pair(pair) for pair in pairs}.values())  # last per key
            keys = {entry.key for entry in written}
            self._update_locked(lambda entries: [e for e in entries if e.key not in keys] + written)
        return written

    def _write_pair(self, pair: TrainingPair) -> SavedPair:
        arrays = _arrays(pair)
        name = f"pair-{_digest(pair, arrays)}.npz"
        path = self.folder / name
        if not path.is_file():  # content-addressed: an existing file already holds these bytes

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as stream:
                    np.savez(stream, **arrays)

            atomic_write(path, write)
        return SavedPair(name, pair.image_name, pair.labels_name, pair.model_source, len(pair.images),
                         time.strftime("%Y-%m-%dT%H:%M:%S"), self.session, pair.mpp)

    def remove(self, keys: Iterable[tuple[str, str]]) -> None:
        """Forgets the saved pairs with these keys (image name, model source)."""
        keys = set(keys)
        if keys:
            self._update(lambda entries: [e for e in entries if e.key not in keys])

    def adopt(self, entries: Sequence[SavedPair]) -> None:
        """Makes recovered entries this session's own (they are no longer offered as pending)."""
        files = {entry.file for entry in entries}
        self._update(lambda current: [
            SavedPair(**{**asdict(e), "session": self.session}) if e.file in files else e for e in current])

    def clear(self) -> None:
        """Removes every saved pair."""
        self._update(lambda entries: [])

    def _update(self, change) -> None:  # noqa: ANN001 - Callable[[list[SavedPair]], list[SavedPair]]
        """Read-modify-writes the index under the lock, then removes unreferenced files."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._update_locked(change)

    def _update_locked(self, change) -> None:  # noqa: ANN001
        entries = change(self.entries())
        text = json.dumps({"version": VERSION, "pairs": [asdict(e) for e in entries]}, indent=1)
        atomic_write(self.folder / INDEX, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        keep = {entry.file for entry in entries}
        for path in self.folder.glob("pair-*.npz"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
        for path in self.folder.glob(".*.tmp"):  # left by a process killed while writing
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > 60:
                    path.unlink()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one napari at a time is the common case
            yield
            return
        with open(self.folder / ".lock", "a+") as stream:
            fcntl.flock(stream, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(stream, fcntl.LOCK_UN)
