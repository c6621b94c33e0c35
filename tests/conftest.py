"""Puts the repository root on sys.path, so tests import the top-level modules."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_terminal_summary(terminalreporter):
    """Prints the worst differences against the original's reference data, per array group."""
    module = sys.modules.get('test_reference') or sys.modules.get('tests.test_reference')
    worst = getattr(module, 'WORST', None)
    if not worst:
        return
    terminalreporter.section('worst differences from the original (reference data)')
    for (folder, group), (diff, rel) in sorted(worst.items()):
        terminalreporter.write_line(f'{folder:20s} {group:34s} max |Δ| {diff:.2e}   relative to max |ref| {rel:.2e}')
