"""Edit accounting: how much of a corrected mask differs from what the model wrote (headless).

`count_edits` compares corrections with the written mask plane by plane
(`napari_sgdc.train.corrections.edit_summary`, as instances for instance models; with
types, an object whose type the user changed counts as an edited object,
`napari_sgdc.train.corrections.retyped_pixels`); an
`EditCount` says it in one line for the Fine-tune dock. The pixels counted here are the
ones fine-tuning crops to and weighs most (`napari_sgdc.train.finetune(predictions=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["EditCount", "count_edits"]


@dataclass(frozen=True)
class EditCount:
    """What the user changed in a mask.

    Attributes:
        pixels: edited pixels over all planes.
        objects: objects involved (`napari_sgdc.train.corrections.EditSummary.objects`), summed.
        planes: planes with at least one edited pixel.
        size: pixels of the whole mask (for the share).
        stack: whether the mask has several planes (the text then names the planes).
        retyped: objects whose type the user changed (counted in `objects`, their pixels in `pixels`).
    """

    pixels: int
    objects: int
    planes: int
    size: int
    stack: bool = False
    retyped: int = 0

    def text(self, target: str = "mask") -> str:
        """One line for the dock: ``"120 px (0.3%) in 2 objects; they weigh most in fine-tuning"``.

        Args:
            target: ``"mask"`` (an image's own mask) or ``"region"`` (a slide region's corrections).
        """
        if not self.pixels:
            return f"no edits yet: paint or erase on the {target}"
        noun = "object" if self.objects == 1 else "objects"
        if self.retyped:
            noun += f" ({self.retyped} retyped)"
        if target == "region":
            return f"{self.pixels} px in {self.objects} {noun} of the region; they weigh most in fine-tuning"
        where = f" on {self.planes} plane{'s' if self.planes > 1 else ''}" if self.stack else ""
        share = 100.0 * self.pixels / max(1, self.size)
        return f"{self.pixels} px ({share:.1f}%) in {self.objects} {noun}{where}; they weigh most in fine-tuning"


def count_edits(labels: np.ndarray, written: np.ndarray, *, instances: bool, stack: bool = False,
                types: np.ndarray | None = None, written_types: np.ndarray | None = None) -> EditCount:
    """Counts the edits of `labels` against the `written` mask they started from.

    Args:
        labels: the corrections, (H, W) or any shape with as many pixels as `written`.
        written: (N, H, W) or (H, W), what the model wrote.
        instances: compare as instances (an instance model) or as foreground.
        stack: `written` holds the planes of a stack.
        types, written_types: the type tables of `labels` and of `written` (typed models):
            an object whose type differs from the one the model wrote there is an edit too.

    Returns:
        The count; zero when nothing was edited.

    Raises:
        ValueError: `labels` and `written` differ in size.
    """
    from napari_sgdc.train import corrections

    written = np.asarray(written)
    written = written.reshape((-1, *written.shape[-2:]))
    labels = np.asarray(labels)
    if labels.size != written.size:
        raise ValueError(f"corrections of shape {labels.shape} do not match the written mask {written.shape}")
    labels = labels.reshape(written.shape)
    pixels = objects = planes = retyped = 0
    typed = instances and types is not None and written_types is not None
    for plane, before in zip(labels, written):
        same = np.array_equal(plane, before)
        retyped_mask = corrections.retyped_pixels(plane, before, types, written_types) if typed else None
        if same and (retyped_mask is None or not retyped_mask.any()):
            continue
        summary = corrections.edit_summary(plane, before, instance=instances)
        extra = 0
        if retyped_mask is not None and retyped_mask.any():
            edited = corrections.edited_pixels(plane, before, instance=True) if not same else np.zeros_like(retyped_mask)
            ids = np.unique(plane[retyped_mask])
            touched = np.unique(plane[edited & (plane > 0)])
            extra = int(np.setdiff1d(ids, touched).size)  # retyped objects not already counted
            summary_pixels = summary.pixels + int((retyped_mask & ~edited).sum())
            retyped += int(ids.size)
        else:
            summary_pixels = summary.pixels
        if summary_pixels:
            pixels, objects, planes = pixels + summary_pixels, objects + summary.objects + extra, planes + 1
    return EditCount(pixels, objects, planes, int(labels.size), stack, retyped)
