"""The python example of README.md's section "## The layer" runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def layer_section_code():
    text = README.read_text()
    start = text.index("\n## The layer\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, f"expected one python block in '## The layer', found {len(blocks)}"
    return blocks[0]


def test_readme_layer_example_runs_in_a_fresh_interpreter():
    # A fresh process without TF_USE_LEGACY_KERAS: the snippet must select Keras 2 by itself.
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run(
        [sys.executable, "-c", layer_section_code()],
        cwd=README.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(4, 28, 28, 1) (4, 6) (4, 28, 28, 2)" in result.stdout
    assert re.search(r"2/2 .* loss: [0-9.]+ - accuracy: [0-9.]+", result.stdout)
