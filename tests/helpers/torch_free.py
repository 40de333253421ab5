"""Run the ``edgetune`` command line as a device without PyTorch would: torch, transformers,
PEFT and their kin look uninstalled (``importlib.util.find_spec`` finds nothing and an import
raises ``ModuleNotFoundError``), although they are in this environment.

    python tests/helpers/torch_free.py device run --trainer ort --artifacts DIR ...
    python tests/helpers/torch_free.py firmware_examples/torch_free_app/app.py ARGS...

On exit it prints ``LOADED-FORBIDDEN: <modules>`` (empty when none was ever imported), so a
test can check both that the run worked and that it never reached for PyTorch. The benchmarks
call ``hide()`` too (``benchmarks/ort.py``, …), to measure a torch-free device in this environment.
"""

import sys

BLOCKED = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "optimum", "safetensors", "gguf")


class _Hiding:
    """Wraps one of the interpreter's finders so that it never finds a blocked package."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def find_distributions(self, *args, **kwargs):
        """``importlib.metadata`` asks finders for distributions: hide the blocked ones too."""
        find = getattr(self.finder, "find_distributions", None)
        if find is None:
            return iter(())
        return (d for d in find(*args, **kwargs)
                if (d.metadata["Name"] or "").lower().replace("_", "-") not in BLOCKED)

    def invalidate_caches(self):
        invalidate = getattr(self.finder, "invalidate_caches", None)
        if invalidate:
            invalidate()


def hide() -> None:
    assert not loaded_forbidden(), "imported before hiding"
    sys.meta_path[:] = [finder if isinstance(finder, _Hiding) else _Hiding(finder) for finder in sys.meta_path]


def loaded_forbidden() -> list[str]:
    return sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)


if __name__ == "__main__":
    hide()
    if len(sys.argv) > 1 and sys.argv[1].endswith(".py"):  # a script: python torch_free.py app.py ARGS
        import runpy

        sys.argv = sys.argv[1:]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    else:
        from edgetune.cli import main

        code = main(sys.argv[1:])
    print("LOADED-FORBIDDEN:" + ",".join(loaded_forbidden()), flush=True)
    sys.exit(code)
