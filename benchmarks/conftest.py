"""pytest setup for ``pytest benchmarks/`` (not part of the default suite: testpaths = tests).

* pyproject's addopts carry ``--benchmark-disable`` for the main suite; here benchmarks are
  turned back on unless ``--benchmark-disable`` was typed on the command line itself.
* ``print_at_end(report, title)``: a test file's report (time and memory of its rows, the ratios)
  is printed as one table at the end of the session, after pytest-benchmark's own.
"""

from __future__ import annotations

import pytest


def pytest_configure(config):
    if hasattr(config.option, "benchmark_enable") and "--benchmark-disable" not in config.invocation_params.args:
        config.option.benchmark_enable = True


class _ReportPrinter:
    """A plugin registered at run time that prints ``report.table()`` in the terminal summary."""

    def __init__(self, report, title: str):
        self.report, self.title = report, title

    @pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table: ours is the last thing printed
    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not self.report.results:
            return
        if getattr(self.report, "other_cpus", 0) is None:  # the machine's load, when not finished yet
            self.report.finish()
        terminalreporter.section(self.title)
        for line in self.report.table().splitlines():
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def print_at_end(request):
    """``print_at_end(report, title)`` -> report, whose table is printed at the end of the session."""

    def register(report, title: str):
        request.config.pluginmanager.register(_ReportPrinter(report, title), f"prorank-fast-report-{title}")
        return report

    return register
