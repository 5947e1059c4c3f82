"""A suite's summary line (``faults: N cases tried, M held``) in pytest's terminal summary, so it shows in a plain
``pytest -q`` run, after the results: ``_summary = case_summary("faults", __file__)`` in a test module."""
from __future__ import annotations

from pathlib import Path

import pytest


class _Counter:
    def __init__(self, label: str, filename: str):
        self.label, self.filename = label, filename
        self.tried = self.held = 0

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and self.filename in report.nodeid:
            self.tried += 1
            self.held += bool(report.passed)

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_line(f"{self.label}: {self.tried} cases tried, {self.held} held")


def case_summary(label: str, module_file: str):
    """An autouse module fixture registering the counter of the module's cases once per session."""
    filename = Path(module_file).name

    @pytest.fixture(scope="module", autouse=True)
    def _summary(request):
        name = f"case-counter-{filename}"
        if request.config.pluginmanager.get_plugin(name) is None:
            request.config.pluginmanager.register(_Counter(label, filename), name)
        yield
    return _summary
