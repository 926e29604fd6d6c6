from pathlib import Path


def test_kernels_folder_imports_as_lmq_kernels():
    import lmq
    import lmq.kernels

    root = Path(lmq.__file__).resolve().parent.parent
    assert Path(lmq.kernels.__file__).resolve().parent == root / "kernels"


def test_cli_help_is_cheap():
    import subprocess
    import sys

    code = "import sys, lmq.cli; assert 'torch' not in sys.modules, 'lmq --help imports torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
