"""napari plugin side of napari-sgdc: the only package part that imports napari, Qt or magicgui.

The widgets call the public headless API (`napari_sgdc.checkpoints`, `napari_sgdc.inference`,
`napari_sgdc.train`) and share one headless `napari_sgdc.session.CorrectionSession` per viewer (`_session`);
every background job runs on the one job runner (`_runner.BackgroundJob`).
"""
