"""lepton_kernels without PyTorch: the core imports alone, lepton_kernels.torch says what it needs."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_core_does_not_import_torch():
    r = run("""
        import sys
        import lepton_kernels as lk
        assert "torch" not in sys.modules, "importing lepton_kernels imported torch"
    """)
    assert r.returncode == 0, r.stderr


def test_clear_import_error_without_torch():
    # sys.modules["torch"] = None makes every `import torch` fail, as on a machine without it.
    r = run("""
        import sys
        sys.modules["torch"] = None
        import lepton_kernels as lk
        for attempt in (lambda: __import__("lepton_kernels.torch"), lambda: lk.torch):
            try:
                attempt()
            except ImportError as e:
                assert "needs PyTorch" in str(e), str(e)
            else:
                raise AssertionError("no ImportError")
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
