"""The command line starts without the heavy libraries: they are imported by the commands that need them."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "flwr", "ray", "opacus", "matplotlib", "skimage", "scipy.stats", "faiss", "sklearn")


def _imported_after(code: str) -> set[str]:
    probe = f"import sys; {code}; print('heavy:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    last = done.stdout.strip().splitlines()[-1]  # --help prints above it
    assert last.startswith("heavy:"), done.stdout[-500:]
    return {name for name in last.removeprefix("heavy:").split(",") if name}


def test_building_the_parser_imports_no_heavy_library() -> None:
    assert _imported_after("from fedinspect.cli import build_parser; build_parser()") == set()


def test_help_of_every_command_imports_no_heavy_library() -> None:
    code = ("from fedinspect.cli import main\n"
            "for argv in (['--help'], ['federate', '--help'], ['classify', '--help'], ['privacy-study', '--help'],\n"
            "             ['synthesize', '--help'], ['synthesis-study', '--help'], ['meta-study', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass")
    assert _imported_after(f"exec({code!r})") == set()


def test_the_probe_sees_a_heavy_import() -> None:
    # the check above can fail: importing the detector does bring torch in
    assert "torch" in _imported_after("import fedinspect.detectors.patchcore")
