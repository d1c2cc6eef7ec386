"""A run's report page: ``python -m report RUN_DIR`` writes ``RUN_DIR/report/index.html``.

The page is self-contained (its PNGs lie beside it; it loads nothing from the internet) and
opens with the run's headline figures, then five sections: data, training, test, errors and
saliency. ``python -m report compare RUN_A RUN_B ...`` puts several runs side by side.

This package sits on top of everything else: it reads run folders, checkpoints and caches
through ``training``, ``models`` and ``dataset``, and nothing imports it.
"""

#: Test images in the errors gallery, and correct ones per class in the saliency section.
DEFAULT_ERRORS = 24
DEFAULT_PER_CLASS = 3
