"""scripts/setup.sh, run on a copy of its inputs with stand-ins for Python, its .venv and df."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Stands in for .venv/bin/python: logs its arguments; pip install fails when FAIL_PIP is set.
RECORDING_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../calls.log"
[ -z "$FAIL_PIP" ] || [ "$1 $2 $3" != "-m pip install" ]
"""
# Stands in for Python 3.11: `-m venv` makes a .venv with the recording python.
BASE_PYTHON = f"""#!/bin/sh
if [ "$1 $2" = "-m venv" ]; then
  rm -rf .venv && mkdir -p .venv/bin && cp "$(dirname "$0")/recording-python" .venv/bin/python
  exit
fi
exec "{sys.executable}" "$@"
"""
# Stands in for df: the free-space check passes whatever this machine has left.
ROOMY_DF = """#!/bin/sh
echo "Filesystem 1048576-blocks Used Available Capacity Mounted on"
echo "fake 100000 0 100000 0% /"
"""


def executable(path, text):
    """Writes a script at `path`, executable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def checkout(tmp_path):
    """What setup.sh reads, under a path with a space; its .venv's python records pip's calls."""
    root = tmp_path / "a checkout"
    (root / "scripts").mkdir(parents=True)
    for name in ("scripts/setup.sh", "pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, root / name)
    executable(tmp_path / "bin" / "recording-python", RECORDING_PYTHON)
    executable(tmp_path / "bin" / "python3.11", BASE_PYTHON)
    executable(tmp_path / "bin" / "df", ROOMY_DF)
    return root


def run_setup(checkout, **env):
    """Runs setup.sh from another directory; -> (exit status, pip's calls)."""
    log = checkout / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    result = subprocess.run(
        ["bash", str(checkout / "scripts" / "setup.sh")],
        cwd=checkout.parent,
        env={
            **os.environ,
            "PATH": f"{checkout.parent / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "PYTHON": str(checkout.parent / "bin" / "python3.11"),
            **env,
        },
        capture_output=True,
        text=True,
        check=False,
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return result.returncode, [c for c in calls if c.startswith("-m pip install")]


def test_every_install_is_pinned(checkout):
    returncode, installs = run_setup(checkout)
    assert returncode == 0
    assert installs and all("-c constraints.txt" in call for call in installs)
    assert [call for call in installs if " -e " in call]  # the project, editable


def test_the_install_is_skipped_only_after_one_that_succeeded(checkout):
    returncode, installs = run_setup(checkout, FAIL_PIP="1")
    assert returncode != 0 and installs
    assert not (checkout / ".venv" / ".installed").exists()
    assert run_setup(checkout)[0] == 0
    assert run_setup(checkout) == (0, [])


def test_a_venv_cut_short_before_pip_is_made_again(checkout):
    """Ctrl-C while `python -m venv` runs ensurepip leaves a python without pip."""
    executable(checkout / ".venv" / "bin" / "python", "#!/bin/sh\nexit 1\n")
    returncode, installs = run_setup(checkout)
    assert returncode == 0 and installs


def test_a_venv_of_another_python_is_made_again(checkout):
    """A .venv made by Python 3.12 has pip, but the pinned stack has no 3.12 wheels."""
    executable(
        checkout / ".venv" / "bin" / "python",
        f'#!/bin/sh\n[ "$1" = -c ] || exit 0\n'
        f'exec "{sys.executable}" -c "import sys; sys.version_info = (3, 12, 1); $2"\n',
    )
    returncode, installs = run_setup(checkout)
    assert returncode == 0 and installs


def test_an_installed_venv_whose_interpreter_is_gone_is_made_again(checkout):
    """A stamped .venv whose base Python was removed (a pyenv uninstall) cannot run at all."""
    assert run_setup(checkout)[0] == 0
    venv_python = checkout / ".venv" / "bin" / "python"
    venv_python.unlink()
    venv_python.symlink_to(checkout.parent / "removed" / "python3.11")
    returncode, installs = run_setup(checkout)
    assert returncode == 0 and installs
