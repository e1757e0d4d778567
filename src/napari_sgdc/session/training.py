"""The fine-tune training list: corrected pairs, kept on disk until trained (headless).

A `TrainingList` holds the pairs the user added (one per image and model: a newer pair of
the same image replaces the older one), autosaves every pair it gets
(`napari_sgdc.autosave.Autosave`), forgets the autosave of pairs once a kept fine-tune
holds them, and recovers what earlier sessions left behind. Autosave failures never raise:
they go to ``on_problem`` (the dock shows a warning once).

With ``background=True`` (the Fine-tune dock) every write runs on one writer thread, in the
order asked, so a large pair never freezes the window; the pair is in the list (memory) before
its write starts, reads (`pending`, `recover`) wait for the writes before them (`flush`), and
the writer thread is joined at exit, so a closing napari finishes writing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from napari_sgdc.autosave import Autosave, SavedPair
from napari_sgdc.session.models import display_name
from napari_sgdc.training_pairs import InputError, TrainingPair, split_by_model

__all__ = ["TrainingList"]


class TrainingList:
    """The pairs of the training list, autosaved.

    Args:
        autosave: where pairs are autosaved (default: `Autosave()` of this session).
        on_problem: called with one line when the autosave cannot be written or read (from the
            writer thread when `background`).
        background: write on one background thread, in order (`flush` waits for the writes).

    Attributes:
        pairs: the pairs, oldest first.
    """

    def __init__(self, autosave: Autosave | None = None,
                 on_problem: Callable[[str], Any] | None = None, *, background: bool = False) -> None:
        self.autosave = autosave if autosave is not None else Autosave()
        self.on_problem = on_problem
        self.pairs: list[TrainingPair] = []
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sgdc-autosave") if background else None
        self._writes: list[Future] = []

    @property
    def titles(self) -> list[str]:
        """The text of each pair in the list."""
        return [pair.title for pair in self.pairs]

    def _problem(self, action: str, exc: BaseException) -> None:
        if self.on_problem is None:
            return
        if action == "write":
            self.on_problem(f"Could not autosave the corrections to {self.autosave.folder}: {exc}")
        else:
            self.on_problem(f"Could not {action} the autosave in {self.autosave.folder}: {exc}")

    def _write(self, action: str, job: Callable[[], Any], now: bool = False) -> None:
        """Runs `job` now (`now`, or no writer thread), else queues it on the writer thread; a
        failure goes to ``on_problem``."""
        def guarded() -> None:
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - e.g. a full disk: keep working
                self._problem(action, exc)

        if self._writer is None or now:
            guarded()
            return
        self._writes = [write for write in self._writes if not write.done()] + [self._writer.submit(guarded)]

    def flush(self, timeout: float | None = None) -> bool:
        """Waits for the queued writes; True when none is left."""
        return not wait(self._writes, timeout=timeout).not_done

    def save(self, pairs: Iterable[TrainingPair]) -> None:
        """Autosaves `pairs` (a failure goes to ``on_problem``)."""
        pairs = list(pairs)
        self._write("write", lambda: self.autosave.save(pairs))

    def forget(self, keys: Iterable[tuple[str, str]]) -> None:
        """Removes the autosaved pairs with these keys (image name, model source)."""
        keys = list(keys)
        self._write("update", lambda: self.autosave.remove(keys))

    def put(self, pair: TrainingPair) -> None:
        """Adds `pair` (replacing an earlier pair of the same image for the same model) and autosaves it."""
        self.pairs = [p for p in self.pairs if p.key != pair.key] + [pair]
        self.save([pair])

    def remove(self, titles: Iterable[str]) -> None:
        """Removes the pairs with these titles from the list and from the autosave."""
        titles = set(titles)
        self.forget([pair.key for pair in self.pairs if pair.title in titles])
        self.pairs = [pair for pair in self.pairs if pair.title not in titles]

    def for_model(self, source: str) -> tuple[list[TrainingPair], str]:
        """The pairs made for model `source`, and a note naming the pairs left out (or "").

        Raises:
            InputError: the list holds no pair for `source`.
        """
        kept, excluded = split_by_model(self.pairs, source)
        model = display_name(source)
        if not kept and not excluded:
            raise InputError("No corrections: segment an image, paint on its mask layer, then fine-tune.")
        if not excluded:
            return kept, ""
        others = ", ".join(sorted({pair.model_name for pair in excluded}))
        names = ", ".join(pair.image_name for pair in excluded)
        if not kept:
            raise InputError(
                f"No corrections for '{model}': the training list only holds pairs made for {others} "
                f"({names}). Pick that model, or segment and correct an image with '{model}'."
            )
        return kept, (f"Fine-tuning '{model}' on its {len(kept)} pair(s); left out {len(excluded)} pair(s) "
                      f"made for {others}: {names}.")

    def trained(self, pairs: Sequence[TrainingPair]) -> None:
        """A kept run holds `pairs`: their autosave is no longer needed (a newer pair of one of
        the images, added meanwhile, stays saved)."""
        self.forget([pair.key for pair in pairs if any(pair is current for current in self.pairs)])

    def untrained(self, source: str, images: Sequence[str]) -> None:
        """An undone run no longer holds the pairs of `images` for model `source`: save them again."""
        self.save([pair for pair in self.pairs if pair.model_source == source and pair.image_name in images])

    # -- recovery ------------------------------------------------------------------------
    def pending(self) -> list[SavedPair]:
        """Autosaved pairs of earlier (or other) sessions; [] when the autosave cannot be read."""
        self.flush()
        try:
            return self.autosave.pending()
        except Exception as exc:  # noqa: BLE001
            self._problem("read", exc)
            return []

    def recover(self) -> tuple[list[TrainingPair], list[str]]:
        """Adds the pending pairs back to the list and makes them this session's own.

        Returns:
            The recovered pairs, and one line per pair that could not be read.
        """
        pending = self.pending()
        pairs, problems = self.autosave.load(pending)
        for pair in pairs:
            self.pairs = [p for p in self.pairs if p.key != pair.key] + [pair]
        readable = {pair.key for pair in pairs}
        # at once (`pending` flushed the queue): what was recovered is no longer offered
        self._write("update", lambda: self.autosave.adopt([entry for entry in pending if entry.key in readable]), now=True)
        return pairs, problems

    def discard(self) -> None:
        """Deletes the pending pairs of earlier sessions."""
        self.forget([entry.key for entry in self.pending()])
