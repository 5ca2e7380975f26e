"""The examples of README.md run as written: the python of "## The layer", the YAML of
"## Configuration", the predict request of "## The two commands"."""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def section_block(title, language):
    """The one ```language block of README.md's section `title`."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, f"expected one {language} block in '## {title}', found {len(blocks)}"
    return blocks[0]


def test_readme_layer_example_runs_in_a_fresh_interpreter():
    # A fresh process without TF_USE_LEGACY_KERAS: the snippet must select Keras 2 by itself.
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run(
        [sys.executable, "-c", section_block("The layer", "python")],
        cwd=README.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(4, 28, 28, 1) (4, 6) (4, 28, 28, 2)" in result.stdout
    assert re.search(r"2/2 .* loss: [0-9.]+ - accuracy: [0-9.]+", result.stdout)


def test_readme_configuration_example_loads_and_states_the_defaults(tmp_path):
    """Every field it sets but `home` and `multiworker` shows the default value."""
    import yaml

    from pipeline.configs import PipelineConfig, load_config

    path = tmp_path / "readme.yaml"
    path.write_text(section_block("Configuration", "yaml"))
    config = load_config(str(path))
    assert config.multiworker_config().num_workers == 2
    shown = set(yaml.safe_load(path.read_text())) - {"home", "multiworker"}
    assert {"st_iterations", "equivariance_weight"} <= shown
    for name in shown:
        assert getattr(config, name) == getattr(PipelineConfig(), name), name


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_readme_predict_request_pasted_as_a_block_gets_predictions(tmp_path):
    """Pasted whole, the request is sent while the server is still starting."""
    from pipeline.linear_savedmodel import NUM_PIXELS, save_linear_classifier

    home = tmp_path / "stn_home"
    save_linear_classifier(str(home / "serving/stn/1"), np.zeros((NUM_PIXELS, 10)), np.zeros(10))
    (home / "data/span-1/eval/7").mkdir(parents=True)
    Image.fromarray(np.zeros((42, 42), np.uint8)).save(home / "data/span-1/eval/7/0.png")
    command = tmp_path / ".venv/bin/stn-pipeline"
    command.parent.mkdir(parents=True)
    command.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pipeline.cli "$@"\n')
    command.chmod(0o755)
    with socket.socket() as probe:  # a free port for 8501, which may be taken here
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    (block,) = [block for block in blocks if "serve &" in block]
    block = block.replace("serve &", f"serve --port {port} &").replace(":8501", f":{port}")
    env = {**os.environ, "PYTHONPATH": str(README.parent), "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen(
        ["bash", "-c", block + 'kill "$!"; wait "$!"\n'],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = process.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a server that outlived the block
            os.killpg(process.pid, signal.SIGKILL)
    assert out.startswith('{"predictions": [{"classes": '), out
