"""Put on PYTHONPATH by tests/test_entry_points.py: every Python process of an entry point (a
torchrun worker or a suite's child process too) records, as it exits, what `import kernels`
resolves to from its own sys.path and whether transformers' model classes import, in
$PRORANK_IMPORT_PROBE/<pid>.json."""

import atexit
import json
import os
import sys


def _record() -> None:
    report = {"argv": sys.argv, "path": [os.path.realpath(p or os.curdir) for p in sys.path]}
    report["kernels_imported_by_run"] = "kernels" in sys.modules
    try:
        import kernels

        report["kernels"] = os.path.realpath(kernels.__file__)
    except ModuleNotFoundError as exc:
        report["kernels"] = None if exc.name == "kernels" else repr(exc)
    except Exception as exc:  # the failure this probe is here to catch: the wrong `kernels` found first
        report["kernels"] = repr(exc)
    try:
        from transformers import AutoModelForCausalLM  # noqa: F401

        report["transformers"] = "ok"
    except Exception as exc:
        report["transformers"] = repr(exc)
    with open(os.path.join(os.environ["PRORANK_IMPORT_PROBE"], f"{os.getpid()}.json"), "w") as f:
        json.dump(report, f)


if os.environ.get("PRORANK_IMPORT_PROBE"):
    atexit.register(_record)
