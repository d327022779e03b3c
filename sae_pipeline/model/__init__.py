"""Models: loading (loading.py), hook names and their modules (hook_points.py), capture and splice (hooks.py),
the embedded default model and text (assets.py)."""
