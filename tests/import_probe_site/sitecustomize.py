"""Put on PYTHONPATH by tests/import_probe.py: every Python process of an entry point (a
torchrun worker or a suite's child process too) records, as it exits, what `import kernels`
resolves to from its own sys.path and whether transformers' model classes import, in
$PRORANK_IMPORT_PROBE/<pid>.json.

Where the run imported `kernels` itself, that module is the answer. Otherwise the imports are tried
in a child Python given exactly this process's sys.path (-S: no site, so no probe there): at exit
the interpreter may refuse what an import does (atexit registration)."""

import atexit
import json
import os
import subprocess
import sys

_CHECK = """
import json, os, sys
sys.path[:] = json.loads(sys.argv[1])
report = {}
try:
    import kernels
    report["kernels"] = os.path.realpath(kernels.__file__)
except ModuleNotFoundError as exc:
    report["kernels"] = None if exc.name == "kernels" else repr(exc)
except Exception as exc:  # the failure this probe is here to catch: the wrong `kernels` found first
    report["kernels"] = repr(exc)
try:
    from transformers import AutoModelForCausalLM
    report["transformers"] = "ok"
except Exception as exc:
    report["transformers"] = repr(exc)
print(json.dumps(report))
"""


def _in_process() -> dict | None:
    """The answer without a child, where the run itself imported `kernels` (through transformers):
    what it got is what `import kernels` gives here. None where that cannot be told."""
    imported = sys.modules.get("kernels")
    if imported is None:
        return None
    try:
        from transformers import AutoModelForCausalLM  # noqa: F401
    except Exception:  # e.g. an import that registers atexit, refused during shutdown: ask a child
        return None
    return {"kernels": os.path.realpath(imported.__file__), "transformers": "ok"}


def _record() -> None:
    report = {"argv": sys.argv, "path": [os.path.realpath(p or os.curdir) for p in sys.path]}
    imported = sys.modules.get("kernels")
    report["kernels_imported_by_run"] = None if imported is None else os.path.realpath(imported.__file__)
    answer = _in_process()
    if answer is None:
        child = subprocess.run(
            [sys.executable, "-S", "-c", _CHECK, json.dumps(sys.path)], cwd=os.getcwd(), capture_output=True, text=True
        )
        answer = json.loads(child.stdout) if child.returncode == 0 else {"kernels": child.stderr[-2000:]}
    report.update(answer)
    with open(os.path.join(os.environ["PRORANK_IMPORT_PROBE"], f"{os.getpid()}.json"), "w") as f:
        json.dump(report, f)


if os.environ.get("PRORANK_IMPORT_PROBE"):
    atexit.register(_record)
