"""Put on PYTHONPATH by tests/import_probe.py: every Python process of an entry point (a
torchrun worker or a suite's child process too) records, as it exits, what `import kernels`
resolves to from its own sys.path and whether transformers' model classes import, in
$PRORANK_IMPORT_PROBE/<pid>.json.

The imports are tried in a child Python given exactly this process's sys.path (-S: no site, so no
probe there): at exit the interpreter may refuse what an import does (atexit registration), and
the child's answer does not depend on what this process happened to import."""

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


def _record() -> None:
    report = {"argv": sys.argv, "path": [os.path.realpath(p or os.curdir) for p in sys.path]}
    imported = sys.modules.get("kernels")
    report["kernels_imported_by_run"] = None if imported is None else os.path.realpath(imported.__file__)
    child = subprocess.run(
        [sys.executable, "-S", "-c", _CHECK, json.dumps(sys.path)], cwd=os.getcwd(), capture_output=True, text=True
    )
    report.update(json.loads(child.stdout) if child.returncode == 0 else {"kernels": child.stderr[-2000:]})
    with open(os.path.join(os.environ["PRORANK_IMPORT_PROBE"], f"{os.getpid()}.json"), "w") as f:
        json.dump(report, f)


if os.environ.get("PRORANK_IMPORT_PROBE"):
    atexit.register(_record)
