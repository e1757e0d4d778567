"""The main job: napari with the plugin docked and a sample image, or a headless run.

    python -m napari_sgdc.demo                      # napari, SGDC Segment docked, dermoscopy sample
    python -m napari_sgdc.demo --sample nuclei      # the H&E sample instead
    python -m napari_sgdc.demo --headless --out sgdc_demo
        # no display needed: segments the sample and writes mask, boundary and gate PNGs

Without a display (no ``DISPLAY``/``WAYLAND_DISPLAY`` on Linux) the headless variant runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .samples import SAMPLES


def _has_display() -> bool:
    if sys.platform != "linux":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def run_headless(sample: str, model_name: str, out: Path, device: str = "auto",
                 overwrite: bool = True) -> list[Path]:
    """Segments a bundled sample and writes image, mask, probability, boundary and gate PNGs into `out`."""
    from .files import write_result
    from .inference import segment
    from .checkpoints import load_model
    from .samples import read_sample

    image = read_sample(sample)
    model = load_model(model_name, device=device)
    result = segment(model, image, return_gates=True, tile=None)
    return write_result(result, out, sample, "preview", image=image, overwrite=overwrite)


def setup_viewer(viewer, sample: str) -> None:
    """Opens the sample in `viewer`, docks both plugin widgets and fits the sample to the canvas.

    The docks narrow the canvas after the sample was first fitted, so the view is reset
    once Qt has laid them out (otherwise the sample is cut off at the edges).
    """
    from qtpy.QtWidgets import QApplication

    viewer.open_sample("napari-sgdc", sample)
    viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    QApplication.processEvents()
    viewer.reset_view()


def run_gui(sample: str) -> None:
    """Opens napari with the sample and both plugin widgets docked."""
    import napari

    setup_viewer(napari.Viewer(), sample)
    napari.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_sgdc.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--sample", choices=sorted(SAMPLES), default="dermoscopy")
    parser.add_argument("--headless", action="store_true", help="write PNGs instead of opening napari")
    parser.add_argument("--model", help="model for the headless run (default: the sample's built-in model)")
    parser.add_argument("--out", type=Path, default=Path("sgdc_demo"), help="output folder of the headless run")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.headless or not _has_display():
        try:
            paths = run_headless(args.sample, args.model or SAMPLES[args.sample].model, args.out, args.device)
        except (FileNotFoundError, ValueError) as error:
            print(f"napari-sgdc demo: error: {error}", file=sys.stderr)
            return 1
        print("\n".join(str(path) for path in paths))
        return 0
    run_gui(args.sample)
    return 0


if __name__ == "__main__":
    sys.exit(main())
