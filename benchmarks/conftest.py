"""pytest setup for ``pytest benchmarks/`` (not part of the default suite: testpaths = tests).

* pyproject's addopts carry ``--benchmark-disable`` for the main suite; here benchmarks are
  turned back on unless ``--benchmark-disable`` was typed on the command line itself.
* The CPU GRPO tests record time and memory into one ``cpu_grpo.Report``; its table (with the
  ours/baseline and ours/liger ratios) is printed at the end of the session.
"""

from __future__ import annotations

import pytest

_REPORT_KEY = pytest.StashKey()


def pytest_configure(config):
    if hasattr(config.option, "benchmark_enable") and "--benchmark-disable" not in config.invocation_params.args:
        config.option.benchmark_enable = True


@pytest.fixture(scope="session")
def cpu_grpo_report(request):
    from benchmarks import cpu_grpo

    report = request.config.stash.get(_REPORT_KEY, None)
    if report is None:
        report = cpu_grpo.Report(cpu_grpo.CPUConfig.from_env())
        request.config.stash[_REPORT_KEY] = report
    return report


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table: ours is the last thing printed
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    report = config.stash.get(_REPORT_KEY, None)
    if report is None or not report.results:
        return
    terminalreporter.section("prorank-fast CPU GRPO benchmark (time and peak memory)")
    for line in report.table().splitlines():
        terminalreporter.write_line(line)
